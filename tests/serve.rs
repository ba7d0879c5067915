//! `serve`, `validate` and `status` with a config file of several pipelines: tenants see and
//! write only their own tables and files, a failing tenant is restarted while its neighbour
//! keeps flowing, every config problem is listed at once, and a standby host takes a pipeline
//! over when the active one is killed, with nothing lost.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use pgstream_e2e::tenants::{jsonl_pipeline, start_host, upserted, write_config};
use pgstream_e2e::{HOST_RUN_TIMEOUT, HostProcess, PgServer, PgVersion, TestDb, wait_until};
use tempfile::TempDir;

fn host(command: &str, config: &Path, db: &TestDb) -> HostProcess {
    start_host(command, config, db)
}

async fn run_to_exit(command: &str, config: &Path, db: &TestDb) -> (bool, String) {
    let mut process = host(command, config, db);
    let status = process
        .wait_timeout(HOST_RUN_TIMEOUT)
        .await
        .expect("the host exits");
    (status.success(), process.log())
}

async fn insert(db: &TestDb, table: &str, ids: std::ops::RangeInclusive<i64>) {
    db.exec(&format!(
        "INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series({}, {}) g",
        ids.start(),
        ids.end()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_lists_every_problem_and_passes_a_good_file() {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    let folder = TempDir::new().unwrap();
    let a = folder.path().join("a.jsonl");
    let good = write_config(
        folder.path(),
        "",
        &[
            jsonl_pipeline("tenant_a", "a_docs", "trap-handler", &a, ""),
            jsonl_pipeline(
                "tenant_b",
                "b_docs",
                "trap-handler",
                &folder.path().join("b.jsonl"),
                "",
            ),
        ],
    );
    let (ok, log) = run_to_exit("validate", &good, &db).await;
    assert!(ok, "{log}");
    assert!(log.contains("ok, 2 pipelines: tenant_a, tenant_b"), "{log}");

    let bad = write_config(
        folder.path(),
        "",
        &[
            jsonl_pipeline(
                "tenant_a",
                "a_docs",
                "trap-handler",
                &a,
                "batch_size = 0\nembed_texts_per_second = 0",
            ),
            // Same file as tenant_a, a slot name Postgres refuses.
            jsonl_pipeline("Tenant-B", "b_docs", "trap-handler", &a, ""),
        ],
    );
    let (ok, log) = run_to_exit("validate", &bad, &db).await;
    assert!(!ok, "{log}");
    for needle in [
        "pipeline tenant_a: batch_size: must be at least 1",
        "pipeline tenant_a: embed_texts_per_second: must be at least 1",
        "pipeline Tenant-B: name: invalid replication slot name \"Tenant-B\"",
        "both write jsonl",
    ] {
        assert!(log.contains(needle), "{needle:?} missing from:\n{log}");
    }

    let typo = std::fs::read_to_string(&good)
        .unwrap()
        .replace("batch_wait_ms", "batch_wiat_ms");
    std::fs::write(&good, typo).unwrap();
    let (ok, log) = run_to_exit("validate", &good, &db).await;
    assert!(!ok && log.contains("batch_wiat_ms"), "{log}");
    assert!(log.contains("pgstream.toml:"), "the line is named:\n{log}");
    assert!(!log.contains(db.dsn()), "the DSN is never printed:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_and_a_failing_one_does_not_stop_its_neighbour() {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    db.exec(
        "CREATE TABLE a_docs (id int PRIMARY KEY, content text);
         CREATE TABLE b_docs (id int PRIMARY KEY, content text);",
    )
    .await;
    let folder = TempDir::new().unwrap();
    let (a, b) = (folder.path().join("a.jsonl"), folder.path().join("b.jsonl"));
    let config = write_config(
        folder.path(),
        "",
        &[
            jsonl_pipeline("tenant_a", "a_docs", "trap-handler", &a, ""),
            jsonl_pipeline("tenant_b", "b_docs", "trap-handler", &b, "max_attempts = 1"),
        ],
    );
    let mut serve = host("serve", &config, &db);
    wait_until(HOST_RUN_TIMEOUT, || async {
        serve.log().matches(" streaming ").count() >= 2
    })
    .await
    .unwrap_or_else(|error| panic!("both pipelines stream: {error}\n{}", serve.log()));

    insert(&db, "a_docs", 1..=20).await;
    insert(&db, "b_docs", 1..=20).await;
    wait_until(Duration::from_secs(60), || async {
        upserted(&a).0.len() == 20 && upserted(&b).0.len() == 20
    })
    .await
    .unwrap_or_else(|error| panic!("both tenants flow: {error}\n{}", serve.log()));

    // Tenant b's handler traps on this row, on every try: b fails and is restarted, a goes on.
    db.exec("INSERT INTO b_docs VALUES (21, 'boom')").await;
    wait_until(Duration::from_secs(60), || async {
        serve
            .log()
            .contains("pipeline failed; restarting it after a wait")
    })
    .await
    .unwrap_or_else(|error| panic!("tenant b fails: {error}\n{}", serve.log()));
    insert(&db, "a_docs", 21..=200).await;
    wait_until(Duration::from_secs(60), || async {
        upserted(&a).0.len() == 200
    })
    .await
    .unwrap_or_else(|error| panic!("tenant a keeps flowing: {error}\n{}", serve.log()));

    let (a_ids, a_tables) = upserted(&a);
    let (b_ids, b_tables) = upserted(&b);
    assert_eq!(a_ids, (1..=200).collect());
    assert_eq!(a_tables, BTreeSet::from(["a_docs".to_owned()]));
    assert_eq!(
        b_ids,
        (1..=20).collect(),
        "nothing of b's poison batch was written"
    );
    assert_eq!(b_tables, BTreeSet::from(["b_docs".to_owned()]));

    // `status` from another process: a streams, b is being restarted, with its reason.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let lines = loop {
        let (ok, log) = run_to_exit("status", &config, &db).await;
        let line = |name: &str| {
            log.lines()
                .find(|line| line.starts_with(name))
                .unwrap_or_default()
                .to_owned()
        };
        if ok
            && line("tenant_a").contains("streaming")
            && line("tenant_b").contains("boom")
            && !line("tenant_b").contains("streaming ")
        {
            break log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status shows both:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(!lines.contains(db.dsn()), "{lines}");

    let status = serve.terminate(HOST_RUN_TIMEOUT).await.unwrap();
    assert!(status.success(), "serve stops cleanly:\n{}", serve.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_active_host_is_killed_and_nothing_is_lost() {
    let db = PgServer::shared(PgVersion::Pg18).create_database().await;
    db.exec("CREATE TABLE docs (id int PRIMARY KEY, content text);")
        .await;
    let folder = TempDir::new().unwrap();
    let sink = folder.path().join("docs.jsonl");
    let config = write_config(
        folder.path(),
        "",
        &[jsonl_pipeline("docs", "docs", "trap-handler", &sink, "")],
    );
    let mut first = host("serve", &config, &db);
    first
        .wait_for_log("streaming", HOST_RUN_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", first.log()));
    let mut second = host("serve", &config, &db);
    second
        .wait_for_log("standing by", HOST_RUN_TIMEOUT)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", second.log()));

    insert(&db, "docs", 1..=500).await;
    wait_until(Duration::from_secs(60), || async {
        !upserted(&sink).0.is_empty()
    })
    .await
    .unwrap();
    first.kill().await.unwrap();
    let killed_at = std::time::Instant::now();
    insert(&db, "docs", 501..=1000).await;
    second
        .wait_for_log("took the pipeline's lease", Duration::from_secs(30))
        .await
        .unwrap_or_else(|error| panic!("the standby takes over: {error}\n{}", second.log()));
    wait_until(Duration::from_secs(60), || async {
        upserted(&sink).0.len() == 1000
    })
    .await
    .unwrap_or_else(|error| {
        panic!(
            "everything arrives: {error} ({} ids)\n{}",
            upserted(&sink).0.len(),
            second.log()
        )
    });
    println!(
        "takeover: new WAL written {:?} after the kill",
        killed_at.elapsed()
    );
    assert_eq!(upserted(&sink).0, (1..=1000).collect());
    let status = second.terminate(HOST_RUN_TIMEOUT).await.unwrap();
    assert!(status.success(), "{}", second.log());
}

/// A TCP port that accepts connections and never answers: a sink that hangs.
async fn black_hole() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (port, task)
}

/// The hostile kinds of the multi-tenant issue, each a pipeline of its own beside one
/// well-behaved neighbour: the neighbour gets every row while each hostile pipeline is stopped
/// (and restarted) for its own reason, and nothing a hostile batch did is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hostile_kind_is_contained_while_a_neighbour_keeps_flowing() {
    let db = PgServer::shared(PgVersion::Pg15).create_database().await;
    let hostile = ["loop", "hog", "trap", "embed-flood", "log-flood", "hang"];
    let table = |kind: &str| format!("h_{}", kind.replace('-', "_"));
    let mut ddl = String::from("CREATE TABLE good_docs (id int PRIMARY KEY, content text);");
    for kind in hostile {
        ddl += &format!(
            "CREATE TABLE {} (id int PRIMARY KEY, content text);",
            table(kind)
        );
    }
    db.exec(&ddl).await;
    let (hang_port, _hole) = black_hole().await;
    let folder = TempDir::new().unwrap();
    let sink = |name: &str| folder.path().join(format!("{name}.jsonl"));
    let mut pipelines = vec![jsonl_pipeline(
        "good",
        "good_docs",
        "trap-handler",
        &sink("good"),
        "",
    )];
    for kind in hostile {
        let name = table(kind);
        pipelines.push(if kind == "hang" {
            pgstream_e2e::tenants::pipeline(&name, &name, "trap-handler", "hang", "docs", "")
        } else {
            // Tight limits, so that the test does not wait long for them; the flood's batch
            // is a million host calls and gets the default call timeout.
            let limits = match kind {
                "log-flood" => "",
                _ => "call_timeout_ms = 1000\nmemory_limit_mb = 32\nmax_attempts = 2",
            };
            jsonl_pipeline(&name, &name, "hostile-handler", &sink(&name), limits)
        });
    }
    let config = write_config(
        folder.path(),
        &format!(
            "[sinks.hang]\nkind = \"qdrant\"\nurl = \"http://127.0.0.1:{hang_port}\"\n\
             timeout_ms = 500\nmax_attempts = 1\n"
        ),
        &pipelines,
    );
    let mut serve = host("serve", &config, &db);
    // Every pipeline but the one whose sink hangs reaches the stream.
    wait_until(HOST_RUN_TIMEOUT, || async {
        serve.log().matches(" streaming ").count() >= hostile.len()
    })
    .await
    .unwrap_or_else(|error| panic!("the pipelines stream: {error}\n{}", serve.log()));

    insert(&db, "good_docs", 1..=100).await;
    for kind in hostile {
        insert(&db, &table(kind), 1..=10).await;
        db.exec(&format!(
            "INSERT INTO {} VALUES (11, '{kind}')",
            table(kind)
        ))
        .await;
    }
    // Each misdeed is caught and named in the log.
    let reasons = [
        ("h_loop", "time limit"),
        ("h_hog", "memory"),
        ("h_trap", "hostile-handler traps on purpose"),
        (
            "h_embed_flood",
            "over its pipeline's limit of 10000 texts per call",
        ),
        ("h_hang", "127.0.0.1"),
    ];
    for (name, reason) in reasons {
        wait_until(Duration::from_secs(90), || async {
            serve
                .log()
                .lines()
                .any(|line| line.contains(name) && line.contains(reason))
        })
        .await
        .unwrap_or_else(|error| {
            panic!("{name} is stopped for {reason:?}: {error}\n{}", serve.log())
        });
    }
    // The neighbour flowed all along, and goes on.
    insert(&db, "good_docs", 101..=300).await;
    wait_until(Duration::from_secs(60), || async {
        upserted(&sink("good")).0.len() == 300
    })
    .await
    .unwrap_or_else(|error| panic!("the neighbour keeps flowing: {error}\n{}", serve.log()));
    assert_eq!(upserted(&sink("good")).0, (1..=300).collect());

    // The log flood is cut to the budget, and its batch is handled.
    wait_until(Duration::from_secs(60), || async {
        upserted(&sink("h_log_flood")).0.len() == 11
    })
    .await
    .unwrap_or_else(|error| {
        panic!(
            "the flooding tenant's rows arrive: {error}\n{}",
            serve.log()
        )
    });
    let log = serve.log();
    let flood_lines = log.matches("hostile-handler flood line").count();
    assert!(
        (1..10_000).contains(&flood_lines),
        "{flood_lines} of the 1,000,000 flood lines reached the log"
    );
    assert!(
        log.contains("dropped"),
        "the dropped lines are counted:\n{log}"
    );

    // Nothing of a poison batch was confirmed: the rows before it may have arrived in an
    // earlier batch, row 11 never did.
    for kind in ["loop", "hog", "trap", "embed-flood"] {
        let ids = upserted(&sink(&table(kind))).0;
        assert!(!ids.contains(&11), "{kind}: {ids:?}");
    }
    let status = serve.terminate(HOST_RUN_TIMEOUT).await.unwrap();
    assert!(status.success(), "serve stops cleanly:\n{}", serve.log());
}
