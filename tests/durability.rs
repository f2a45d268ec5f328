//! Durability, against the real binary: acknowledged writes survive
//! `kill -9`, deregistrations stay gone, export/import round-trips, and
//! damaged or locked data files stop start-up with the documented error.
//! In-process tests use the `Store` seam for group commit and restarts.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster::registry::store::{Loaded, StoreError, StoreOp};
use muster::registry::{Change, HealthStatus, Instance, InstanceSpec, Registry, Store};
use serde_json::{Value, json};
use support::{Served, serve};

const BIN: &str = env!("CARGO_BIN_EXE_muster");

/// A config file in `dir` with ephemeral ports and its data in `dir/data`.
fn config_in(dir: &Path) -> String {
    let text = format!(
        "data_dir = {:?}\nzones_dir = {:?}\n[dns]\nlisten = [\"127.0.0.1:0\"]\n[api]\nlisten = \"127.0.0.1:0\"\n[gateway]\nlisten = \"127.0.0.1:0\"\n",
        dir.join("data").display().to_string(),
        support::repo_zones().display().to_string(),
    );
    let path = dir.join("muster.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn kill_9(served: &mut Served) {
    served.child.kill().unwrap();
    served.child.wait().unwrap();
}

fn stop(served: &mut Served) {
    let status = Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(served.child.wait().unwrap().success());
}

fn run(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(BIN).args(args).output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `muster serve` that is expected to fail; its exit code and stderr.
fn serve_fails(config: &str) -> (i32, String) {
    let output = Command::new(BIN)
        .args(["serve", "--config", config])
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn get(client: &reqwest::Client, served: &Served, path: &str) -> (u16, Value) {
    let response = client
        .get(format!("http://{}{path}", served.api))
        .send()
        .await
        .unwrap();
    support::status_and_json(response).await
}

async fn put(client: &reqwest::Client, served: &Served, path: &str, body: &Value) -> (u16, Value) {
    let response = client
        .put(format!("http://{}{path}", served.api))
        .json(body)
        .send()
        .await
        .unwrap();
    support::status_and_json(response).await
}

fn body_of(i: usize) -> Value {
    json!({
        "address": format!("10.{}.{}.{}", i / 65536, i / 256 % 256, i % 256),
        "port": 1000 + i % 60000,
        "ports": {"http": 8080, "dns": {"port": 53, "protocol": "udp"}},
        "tags": [format!("t{}", i % 7)],
        "meta": {"n": i.to_string()},
        "weight": 1 + i % 100,
        "check": {"ttl": "1h", "initial_status": "passing"},
    })
}

#[tokio::test]
async fn every_acknowledged_registration_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    let mut served = serve(&config);
    let client = reqwest::Client::new();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000usize {
        let url = format!(
            "http://{}/v1/services/svc-{}/instances/i-{i}",
            served.api,
            i % 10
        );
        let client = client.clone();
        tasks.spawn(async move {
            let response = client.put(url).json(&body_of(i)).send().await.unwrap();
            support::status_and_json(response).await
        });
    }
    let mut acknowledged = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (status, instance) = done.unwrap();
        assert_eq!(status, 200, "{instance}");
        acknowledged.push(instance);
    }
    kill_9(&mut served); // the moment the last 2xx arrived

    let served = serve(&config);
    for instance in &acknowledged {
        let path = format!(
            "/v1/services/{}/instances/{}",
            instance["service"].as_str().unwrap(),
            instance["id"].as_str().unwrap()
        );
        let (status, stored) = get(&client, &served, &path).await;
        assert_eq!(status, 200, "{path} lost");
        assert_eq!(&stored, instance, "{path} came back different");
    }
    let (_, status) = get(&client, &served, "/v1/status").await;
    assert_eq!(status["instances"], 1000);
    let reply = support::query_udp(
        served.dns,
        &support::query(
            "i-7.svc-7.svc.internal.",
            hickory_proto::rr::RecordType::A,
            None,
        ),
    )
    .await;
    assert_eq!(
        reply.answers.len(),
        1,
        "DNS answers from the restored registry"
    );
}

#[tokio::test]
async fn deregistered_instances_stay_gone_and_state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    let mut served = serve(&config);
    let client = reqwest::Client::new();
    for id in ["a", "b", "c"] {
        let body = json!({"address": "10.0.0.1", "port": 80, "check": {"ttl": "1h"}});
        assert_eq!(
            put(
                &client,
                &served,
                &format!("/v1/services/web/instances/{id}"),
                &body
            )
            .await
            .0,
            200
        );
    }
    let deleted = client
        .delete(format!("http://{}/v1/services/web/instances/b", served.api))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status().as_u16(), 204);
    put(
        &client,
        &served,
        "/v1/services/web/instances/a/heartbeat",
        &json!({"status": "warning", "output": "slow"}),
    )
    .await;
    put(
        &client,
        &served,
        "/v1/services/web/instances/c/maintenance",
        &json!({"enabled": true, "reason": "deploy"}),
    )
    .await;
    let (_, index_before) = get(&client, &served, "/v1/status").await;
    kill_9(&mut served);

    let served = serve(&config);
    assert_eq!(
        get(&client, &served, "/v1/services/web/instances/b")
            .await
            .0,
        404
    );
    let (_, a) = get(&client, &served, "/v1/services/web/instances/a").await;
    assert_eq!(a["health"]["status"], "warning", "health comes back");
    assert_eq!(a["health"]["output"], "slow");
    let (_, c) = get(&client, &served, "/v1/services/web/instances/c").await;
    assert_eq!(c["maintenance"]["reason"], "deploy");
    assert_eq!(c["health"]["status"], "critical");
    let (_, index_after) = get(&client, &served, "/v1/status").await;
    assert_eq!(
        index_after["index"].as_u64().unwrap(),
        index_before["index"].as_u64().unwrap(),
        "indexes continue across restarts"
    );
}

#[tokio::test]
async fn export_wipe_import_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    let data = dir.path().join("data").display().to_string();
    let mut served = serve(&config);
    let client = reqwest::Client::new();
    for i in 0..20usize {
        put(
            &client,
            &served,
            &format!("/v1/services/svc-{}/instances/i-{i}", i % 3),
            &body_of(i),
        )
        .await;
    }
    put(
        &client,
        &served,
        "/v1/services/svc-1/instances/i-1/heartbeat",
        &json!({"status": "warning", "output": "x"}),
    )
    .await;
    put(
        &client,
        &served,
        "/v1/services/svc-2/instances/i-2/maintenance",
        &json!({"enabled": true, "reason": "r"}),
    )
    .await;
    stop(&mut served);

    let (code, first, stderr) = run(&["export", "--data-dir", &data]);
    assert_eq!(code, 0, "{stderr}");
    let exported: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(exported.as_array().unwrap().len(), 20);
    let file = dir.path().join("registry.json");
    std::fs::write(&file, &first).unwrap();

    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    let (code, _, stderr) = run(&["export", "--config", &config]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = run(&["import", "--data-dir", &data, &file.display().to_string()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("imported 20 instances"));
    let (_, second, _) = run(&["export", "--data-dir", &data]);
    assert_eq!(
        second, first,
        "export → wipe → import → export is the identity"
    );

    let served = serve(&config);
    let (status, instance) = get(&client, &served, "/v1/services/svc-2/instances/i-2").await;
    assert_eq!(status, 200);
    assert_eq!(instance["maintenance"]["reason"], "r");
}

#[tokio::test]
async fn a_bad_export_imports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let file = dir.path().join("bad.json");
    let good = json!({"service": "web", "id": "w-1", "address": "10.0.0.1", "port": 80});
    let bad = json!({"service": "web", "id": "w-2", "address": "10.0.0.2", "port": 0});
    std::fs::write(&file, json!([good, bad]).to_string()).unwrap();
    let (code, _, stderr) = run(&["import", "--data-dir", &data, &file.display().to_string()]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("instance [1]") && stderr.contains("port"),
        "{stderr}"
    );
    std::fs::write(&file, json!([good, good]).to_string()).unwrap();
    let (code, _, stderr) = run(&["import", "--data-dir", &data, &file.display().to_string()]);
    assert_eq!(code, 1);
    assert!(stderr.contains("appears twice"), "{stderr}");
    let (code, stdout, _) = run(&["export", "--data-dir", &data]);
    assert_eq!(code, 0);
    assert_eq!(stdout.trim(), "[]");
}

#[tokio::test]
async fn a_locked_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    let _served = serve(&config);
    let (code, _, stderr) = run(&["export", "--config", &config]);
    assert_eq!(code, 1);
    assert!(stderr.contains("locked by another muster"), "{stderr}");
    let (code, stderr) = serve_fails(&config);
    assert_ne!(code, 0);
    assert!(stderr.contains("locked by another muster"), "{stderr}");
}

#[test]
fn damaged_or_newer_data_files_stop_startup_and_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_in(dir.path());
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let file = data.join("registry.redb");

    std::fs::write(
        &file,
        b"this is not a registry, it is a shopping list\n".repeat(100),
    )
    .unwrap();
    let (code, stderr) = serve_fails(&config);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("registry.redb") && stderr.contains("damaged"),
        "{stderr}"
    );
    assert!(
        std::fs::read(&file).unwrap().starts_with(b"this is not"),
        "never silently reset"
    );

    std::fs::remove_file(&file).unwrap();
    let db = redb::Database::create(&file).unwrap();
    let write = db.begin_write().unwrap();
    {
        let mut meta = write
            .open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .unwrap();
        meta.insert("format", 99).unwrap();
    }
    write.commit().unwrap();
    drop(db);
    let (code, stderr) = serve_fails(&config);
    assert_ne!(code, 0);
    assert!(stderr.contains("newer muster (format 99"), "{stderr}");

    std::fs::remove_file(&file).unwrap();
    let db = redb::Database::create(&file).unwrap();
    let write = db.begin_write().unwrap();
    {
        let mut table = write
            .open_table(redb::TableDefinition::<&str, &[u8]>::new("instances"))
            .unwrap();
        let record = json!({"generation": 1, "instance": {"service": "web", "id": "w-1", "address": "10.0.0.1", "port": 99999}});
        table
            .insert("web/w-1", record.to_string().as_bytes())
            .unwrap();
    }
    write.commit().unwrap();
    drop(db);
    let (code, stderr) = serve_fails(&config);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("record \"web/w-1\" is invalid: port"),
        "{stderr}"
    );
}

/// A store that counts commits and makes each take a while, as a disk would.
#[derive(Clone, Default)]
struct SlowStore {
    commits: Arc<AtomicUsize>,
    preload: Arc<Mutex<Vec<Instance>>>,
}

impl Store for SlowStore {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        let instances = std::mem::take(&mut *self.preload.lock().unwrap());
        Ok(Loaded {
            version: 7,
            instances,
        })
    }

    fn commit(&mut self, _version: u64, _ops: &[StoreOp]) -> Result<(), StoreError> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        Ok(())
    }
}

fn instance(id: &str, body: Value) -> Instance {
    let spec: InstanceSpec = serde_json::from_value(body).unwrap();
    spec.into_instance("web", id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_commits() {
    let store = SlowStore::default();
    let registry = Arc::new(Registry::open(Box::new(store.clone()), false).unwrap());
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..64 {
        let registry = registry.clone();
        writers.spawn(async move {
            let change = Change::Register(Box::new(instance(
                &format!("w-{i}"),
                json!({"address": "10.0.0.1", "port": 80}),
            )));
            registry.apply(change).await.unwrap()
        });
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap();
    }
    let commits = store.commits.load(Ordering::SeqCst);
    assert!(commits <= 16, "64 concurrent writes took {commits} commits");
    assert_eq!(registry.snapshot().instance_count(), 64);
    assert!(
        registry.snapshot().version() > 7,
        "versions continue from the store's"
    );
}

#[tokio::test(start_paused = true)]
async fn after_a_restart_ttl_clocks_start_over_with_a_full_ttl() {
    let mut passing = instance(
        "w-1",
        json!({"address": "10.0.0.1", "port": 80, "check": {"ttl": "30s"}}),
    );
    passing.health.status = HealthStatus::Passing;
    passing.generation = 3;
    let store = SlowStore::default();
    store.preload.lock().unwrap().push(passing);
    struct Instant(SlowStore);
    impl Store for Instant {
        fn load(&mut self) -> Result<Loaded, StoreError> {
            self.0.load()
        }
        fn commit(&mut self, _: u64, _: &[StoreOp]) -> Result<(), StoreError> {
            Ok(())
        }
        fn blocks(&self) -> bool {
            false
        }
    }
    let registry = Arc::new(Registry::open(Box::new(Instant(store)), false).unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _checker = muster::registry::health::spawn(registry.clone(), shutdown.clone());
    let status = |registry: &Registry| {
        registry
            .snapshot()
            .instance("web", "w-1")
            .unwrap()
            .health
            .status
    };
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        status(&registry),
        HealthStatus::Passing,
        "it comes back healthy"
    );
    tokio::time::advance(Duration::from_millis(29_999)).await;
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        status(&registry),
        HealthStatus::Passing,
        "a whole TTL from the restart"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    assert_eq!(status(&registry), HealthStatus::Critical);
    shutdown.cancel();
}
