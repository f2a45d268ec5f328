//! The naming scheme: what a name under the registry zone refers to.
//! Pure string work, no registry access, so it is cheap to test
//! exhaustively.

use crate::registry::Protocol;

/// The meaning of a name relative to the registry zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryName<'a> {
    /// The zone itself.
    Apex,
    /// `<service>.Z`
    Service(&'a str),
    /// `<instance>.<service>.Z`
    Instance { service: &'a str, instance: &'a str },
    /// `_<port>._<proto>.<service>.Z`
    Port {
        service: &'a str,
        port: &'a str,
        protocol: Protocol,
    },
    /// `_<proto>.<service>.Z`, an empty non-terminal above port names.
    ProtocolNode {
        service: &'a str,
        protocol: Protocol,
    },
    /// `<tag>…<tag>.tag.<service>.Z`; no tags is the `tag.<service>.Z`
    /// empty non-terminal.
    Tagged {
        service: &'a str,
        tags: Vec<&'a str>,
    },
    /// `_grpc_config.<service>.Z`, the TXT record gRPC clients read.
    GrpcConfig(&'a str),
    /// Not a shape the registry answers for; static data may still exist.
    Other,
}

impl<'a> RegistryName<'a> {
    /// The service the name belongs to, if any.
    pub fn service(&self) -> Option<&'a str> {
        match self {
            Self::Service(service)
            | Self::Instance { service, .. }
            | Self::Port { service, .. }
            | Self::ProtocolNode { service, .. }
            | Self::Tagged { service, .. }
            | Self::GrpcConfig(service) => Some(service),
            Self::Apex | Self::Other => None,
        }
    }
}

/// The label that introduces tag names.
pub const TAG_LABEL: &str = "tag";
/// The label gRPC's DNS resolver prefixes to find a service config.
pub const GRPC_CONFIG_LABEL: &str = "_grpc_config";

/// Classifies `labels`, the labels left of the zone, leftmost first.
pub fn classify<'a>(labels: &[&'a str]) -> RegistryName<'a> {
    let Some((&service, rest)) = labels.split_last() else {
        return RegistryName::Apex;
    };
    match rest {
        [] => RegistryName::Service(service),
        [proto] => match underscored_protocol(proto) {
            Some(protocol) => RegistryName::ProtocolNode { service, protocol },
            None if *proto == TAG_LABEL => RegistryName::Tagged {
                service,
                tags: Vec::new(),
            },
            None if *proto == GRPC_CONFIG_LABEL => RegistryName::GrpcConfig(service),
            None if proto.starts_with('_') => RegistryName::Other,
            None => RegistryName::Instance {
                service,
                instance: proto,
            },
        },
        [port, proto] if underscored_protocol(proto).is_some() => {
            match (port.strip_prefix('_'), underscored_protocol(proto)) {
                (Some(port), Some(protocol)) if !port.is_empty() => RegistryName::Port {
                    service,
                    port,
                    protocol,
                },
                _ => RegistryName::Other,
            }
        }
        [tags @ .., tag] if *tag == TAG_LABEL && !tags.is_empty() => RegistryName::Tagged {
            service,
            tags: tags.to_vec(),
        },
        _ => RegistryName::Other,
    }
}

fn underscored_protocol(label: &str) -> Option<Protocol> {
    label.strip_prefix('_').and_then(Protocol::from_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(name: &str) -> RegistryName<'_> {
        let labels: Vec<&str> = if name.is_empty() {
            Vec::new()
        } else {
            name.split('.').collect()
        };
        // Leak is fine in a test: the labels must outlive the result.
        classify(Box::leak(labels.into_boxed_slice()))
    }

    #[test]
    fn every_shape_in_the_naming_table() {
        assert_eq!(of(""), RegistryName::Apex);
        assert_eq!(of("payment"), RegistryName::Service("payment"));
        assert_eq!(
            of("p-1.payment"),
            RegistryName::Instance {
                service: "payment",
                instance: "p-1"
            }
        );
        assert_eq!(
            of("_http._tcp.payment"),
            RegistryName::Port {
                service: "payment",
                port: "http",
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(
            of("_dns._udp.payment"),
            RegistryName::Port {
                service: "payment",
                port: "dns",
                protocol: Protocol::Udp
            }
        );
        assert_eq!(
            of("_tcp.payment"),
            RegistryName::ProtocolNode {
                service: "payment",
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(
            of("v2.tag.payment"),
            RegistryName::Tagged {
                service: "payment",
                tags: vec!["v2"]
            }
        );
        assert_eq!(
            of("v2.eu.tag.payment"),
            RegistryName::Tagged {
                service: "payment",
                tags: vec!["v2", "eu"]
            }
        );
        assert_eq!(
            of("_grpc_config.payment"),
            RegistryName::GrpcConfig("payment")
        );
        assert_eq!(
            of("tag.payment"),
            RegistryName::Tagged {
                service: "payment",
                tags: vec![]
            }
        );
    }

    #[test]
    fn other_shapes_are_left_to_static_data() {
        for name in [
            "_http.payment",
            "_http._sctp.payment",
            "__tcp.payment",
            "a.b.payment",
            "_._tcp.payment",
            "x._http._tcp.payment",
        ] {
            assert_eq!(of(name), RegistryName::Other, "{name}");
        }
    }
}
