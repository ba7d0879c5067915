//! Test plugin: tries to reach what a sandboxed handler must not (files, directories,
//! environment variables, arguments, the network) and reports what it got as the payload of
//! one point keyed `["probe"]`:
//! `{"env": n, "args": n, "read_dir": "ok"|"error: ...", "read_file": ..., "create_file": ...,
//! "tcp_connect": ...}`.

use std::io::Write;

use pgstream_guest::{ChangeEvent, Error, Handler, Point, PointKey, host};
use serde_json::json;

struct SandboxProbe;

fn outcome<T>(result: std::io::Result<T>) -> String {
    match result {
        Ok(_) => "ok".to_owned(),
        Err(error) => format!("error: {error}"),
    }
}

impl Handler for SandboxProbe {
    fn handle(_events: Vec<ChangeEvent>) -> Result<(), Error> {
        let report = json!({
            "env": std::env::vars_os().count(),
            "args": std::env::args_os().count(),
            "read_dir": outcome(std::fs::read_dir("/")),
            "read_file": outcome(std::fs::read("/etc/passwd")),
            "create_file": outcome(
                std::fs::File::create("/tmp/sandbox-probe").and_then(|mut f| f.write_all(b"x"))
            ),
            "tcp_connect": outcome(std::net::TcpStream::connect("127.0.0.1:5432")),
        });
        host::upsert(&[Point {
            key: PointKey {
                schema: "probe".to_owned(),
                table: "probe".to_owned(),
                key: vec!["probe".to_owned()],
            },
            vector: None,
            payload: report.to_string(),
        }])
    }
}

pgstream_guest::export_handler!(SandboxProbe);
