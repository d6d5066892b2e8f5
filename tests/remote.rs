//! The remote store against a real S3-compatible server (s3s-fs) on 127.0.0.1: two
//! stores sharing it, tampering, concurrent writers, kill -9 mid-upload, the server
//! going away, wrong credentials, a missing bucket.

use crate::common;

use std::time::{Duration, Instant};

use common::s3::{S3Server, SlowLink, BUCKET};
use common::Project;

/// node → content hash, for the nodes `status --json` shows cached.
fn contents(p: &Project) -> Vec<(String, String)> {
    let json: serde_json::Value =
        serde_json::from_str(&p.ok(&["--offline", "status", "--json"])).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "cached")
        .map(|n| {
            (
                n["node"].as_str().unwrap().to_string(),
                n["content_hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The small project, with a `remote` key naming `url`.
fn project_with_remote(url: &str) -> Project {
    let p = Project::small();
    let pipeline = std::fs::read_to_string(p.path().join("pipeline.toml")).unwrap();
    p.write_pipeline(&format!("remote = \"{url}\"\n{pipeline}"));
    p
}

/// A second "machine": the same pipeline and corpus in another directory.
fn second_machine(of: &Project) -> Project {
    let p = Project::empty();
    std::fs::create_dir_all(p.path().join("corpus")).unwrap();
    std::fs::copy(
        of.path().join("corpus/docs.jsonl"),
        p.path().join("corpus/docs.jsonl"),
    )
    .unwrap();
    std::fs::copy(
        of.path().join("pipeline.toml"),
        p.path().join("pipeline.toml"),
    )
    .unwrap();
    p
}

fn manifest_keys(server: &S3Server, prefix: &str) -> Vec<String> {
    server
        .objects(prefix)
        .into_iter()
        .map(|(key, _)| key)
        .filter(|key| key.starts_with("ac/"))
        .collect()
}

#[test]
fn a_second_store_pulls_what_the_first_pushed_and_builds_nothing() {
    let server = S3Server::start();
    let env = server.env();
    let a = project_with_remote(&server.url("team"));
    let first = a.ok_with(&env, &["run"]);
    assert_eq!(first.matches(" built ").count(), 2, "{first}");
    assert_eq!(manifest_keys(&server, "team").len(), 2);

    let b = second_machine(&a);
    let before = b.ok_with(&env, &["status"]);
    assert!(before.contains("remote s3://cachemoney/team"), "{before}");
    assert!(
        before
            .lines()
            .any(|l| l.starts_with("tokens ") && l.contains("missing") && l.contains(" yes ")),
        "{before}"
    );
    let second = b.ok_with(&env, &["run"]);
    for node in ["tokens", "token_stats"] {
        let line = second.lines().find(|l| l.starts_with(node)).unwrap();
        assert!(line.contains("pulled"), "{second}");
    }
    assert!(
        second.contains("2 node(s): 0 reused, 0 built, 2 pulled"),
        "{second}"
    );
    assert_eq!(contents(&a), contents(&b));
    b.ok(&["verify"]);
    // Pushing what the remote holds uploads nothing.
    let again = a.ok_with(&env, &["push"]);
    assert!(
        again.contains("0 pushed") && again.contains("2 already there"),
        "{again}"
    );
    // Offline, the remote is not contacted at all.
    let mut gone = server;
    gone.stop();
    a.ok(&["--offline", "run"]);
}

#[test]
fn pull_fetches_a_node_without_its_upstream_and_verifies_it() {
    let server = S3Server::start();
    let env = server.env();
    let a = project_with_remote(&server.url("p"));
    a.ok_with(&env, &["run"]);
    let b = second_machine(&a);
    let pulled = b.ok_with(&env, &["pull", "token_stats"]);
    assert!(pulled.contains("1 pulled"), "{pulled}");
    // Its recipe is only known through the remote's tokens: offline it cannot resolve.
    let offline = b.ok(&["--offline", "status"]);
    let line = |text: &str, node: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{node} ")))
            .unwrap()
            .to_string()
    };
    assert!(line(&offline, "tokens").contains("missing"), "{offline}");
    assert!(line(&offline, "token_stats").contains("stale"), "{offline}");
    let status = b.ok_with(&env, &["status"]);
    assert!(line(&status, "token_stats").contains("cached"), "{status}");
    // With the remote, `pull` fetches the rest.
    let all = b.ok_with(&env, &["pull"]);
    assert!(
        all.contains("1 pulled") && all.contains("1 already there"),
        "{all}"
    );
    assert_eq!(contents(&a), contents(&b));
}

#[test]
fn a_tampered_remote_object_is_refused_never_stored_and_repaired_by_the_next_push() {
    let server = S3Server::start();
    let env = server.env();
    let a = project_with_remote(&server.url("p"));
    a.ok_with(&env, &["run"]);
    // Flip one byte of the largest blob (same size: only the hash can tell).
    let (key, _) = server
        .objects("p")
        .into_iter()
        .filter(|(k, _)| k.starts_with("cas/"))
        .max_by_key(|(_, size)| *size)
        .unwrap();
    let file = server.object_file(&format!("p/{key}"));
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();

    let b = second_machine(&a);
    let out = b.run_with(&env, &["pull"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let object = format!("s3://{BUCKET}/p/{key}");
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&object) && l.contains("refused")),
        "the refusal names {object}:\n{stderr}"
    );
    // Nothing of the refused artifact was stored, and nothing is left half-written.
    b.ok(&["verify"]);
    let tokenize = b.path().join("artifacts/tokenize");
    assert!(
        std::fs::read_dir(&tokenize).map_or(true, |mut d| d.next().is_none()),
        "a refused artifact reached the store"
    );

    // `run` builds it here instead, and its write-through repairs the remote.
    let out = b.run_with(&env, &["run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&object) && stderr.contains("building it here instead"),
        "{stderr}"
    );
    assert_eq!(contents(&a), contents(&b));
    let c = second_machine(&a);
    let pulled = c.ok_with(&env, &["pull"]);
    assert!(pulled.contains("2 pulled"), "{pulled}");

    // A manifest that lies about its recipe is refused as well.
    let manifest = server
        .objects("p")
        .into_iter()
        .find(|(k, _)| k.starts_with("ac/token-stats/"))
        .unwrap()
        .0;
    let path = server.object_file(&format!("p/{manifest}"));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"token-stats\"", "\"tokenize\"")).unwrap();
    let d = second_machine(&a);
    let status = d.ok_with(&env, &["status"]);
    let line = status
        .lines()
        .find(|l| l.starts_with("token_stats"))
        .unwrap();
    assert!(
        line.contains("refused") && line.contains("`cachemoney run` builds it here"),
        "{status}"
    );
    // The rest is pulled; the refused node is reported and the exit says so.
    let out = d.run_with(&env, &["pull"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("s3://{BUCKET}/p/{manifest}")) && stderr.contains("refused"),
        "{stderr}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("tokens") && l.contains("pulled")),
        "{stdout}"
    );
    d.ok_with(&env, &["sql", "SELECT count(*) FROM val"]);
    // `run` builds it here; `remote gc --dry-run` counts the manifest as broken.
    let run = d.ok_with(&env, &["run"]);
    assert!(run.contains("token_stats"), "{run}");
    assert_eq!(contents(&a), contents(&d));
    let gc = d.run_with(&env, &["remote", "gc", "--dry-run"]);
    let gc_out = String::from_utf8_lossy(&gc.stdout);
    assert!(
        gc_out.contains(&format!("broken s3://{BUCKET}/p/{manifest}"))
            && gc_out.contains("1 broken manifest(s)"),
        "{gc_out}"
    );
}

#[test]
fn concurrent_writers_of_one_recipe_leave_one_manifest_and_no_broken_one() {
    let server = S3Server::start();
    let env = server.env();
    let url = server.url("race");
    let a = project_with_remote(&url);
    a.ok(&["--offline", "run"]);
    let b = second_machine(&a);
    b.ok(&["--offline", "run"]);
    for _ in 0..3 {
        let push = ["push", "-q"];
        let (first, second) = (a.spawn_with(&env, &push), b.spawn_with(&env, &push));
        for child in [first, second] {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert_eq!(manifest_keys(&server, "race").len(), 2);
    let gc = a.ok_with(&env, &["remote", "gc", "--dry-run"]);
    assert!(
        gc.contains("0 unreferenced blob(s)") && gc.contains("0 broken"),
        "{gc}"
    );
    let c = second_machine(&a);
    c.ok_with(&env, &["pull"]);
    assert_eq!(contents(&a), contents(&c));
}

/// A tokenize artifact of several megabytes (an imported shard of random tokens, which
/// Parquet cannot compress away), so that an upload over a slow link takes seconds and
/// goes up in parts.
fn big_project() -> Project {
    let p = Project::empty();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut tokens = vec![1u16];
    tokens.extend((0..6_000_000).map(|_| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        2 + (state % 1022) as u16
    }));
    std::fs::write(
        p.path().join("val.bin"),
        text::shards::encode_shard(&tokens),
    )
    .unwrap();
    p.write_pipeline(&format!(
        "[nodes.tokens]\nstage = \"tokenize\"\nfiles.val = \"val.bin\"\nfiles.tokenizer = {:?}\nparams.source = \"shards\"\nparams.val_truncate_multiple = 0\n",
        common::sp_model().display().to_string()
    ));
    p
}

/// A second "machine" for the big project.
fn big_second_machine(of: &Project) -> Project {
    let p = Project::empty();
    std::fs::copy(of.path().join("val.bin"), p.path().join("val.bin")).unwrap();
    std::fs::copy(
        of.path().join("pipeline.toml"),
        p.path().join("pipeline.toml"),
    )
    .unwrap();
    p
}

/// Returns once the server has received a part of a multipart upload.
fn wait_for_a_part(server: &S3Server) {
    let started = Instant::now();
    let part_arrived = || {
        std::fs::read_dir(server.data.path())
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".upload_id-"))
    };
    while !part_arrived() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no upload part arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_push_killed_mid_upload_leaves_no_manifest_to_a_partial_file_and_the_next_push_finishes() {
    let server = S3Server::start();
    let a = big_project();
    a.ok(&["run", "-q"]);
    let largest = std::fs::read_dir(a.path().join("artifacts/tokenize"))
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|f| f.metadata().unwrap().len())
        .max()
        .unwrap();
    assert!(
        largest > 6 << 20,
        "the test wants a file over one 5 MiB part: {largest}"
    );

    // Through a 4 MB/s link, the upload takes seconds; kill it once parts are arriving.
    let link = SlowLink::start(server.port, 4 << 20);
    let mut env = server.env();
    env[0].1 = link.endpoint();
    env.push(("CACHEMONEY_REMOTE_PART_SIZE", "5M".into()));
    let url = server.url("killed");
    let mut child = a.spawn_with(&env, &["--remote", &url, "push", "-q"]);
    wait_for_a_part(&server);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        manifest_keys(&server, "killed").is_empty(),
        "a manifest was written before its files: {:?}",
        server.objects("killed")
    );
    drop(link);

    let env = server.env();
    let pushed = a.ok_with(&env, &["--remote", &url, "push"]);
    assert!(pushed.contains("1 pushed"), "{pushed}");
    let gc = a.ok_with(&env, &["--remote", &url, "remote", "gc", "--dry-run"]);
    assert!(gc.contains("0 broken"), "{gc}");
    let b = big_second_machine(&a);
    b.ok_with(
        &[
            env.clone(),
            vec![("CACHEMONEY_REMOTE_PART_SIZE", "5M".into())],
        ]
        .concat(),
        &["--remote", &url, "pull"],
    );
    assert_eq!(contents(&a), contents(&b));
}

#[test]
fn the_server_going_away_mid_run_is_a_clear_error_and_the_local_store_stays_intact() {
    let mut server = S3Server::start();
    let a = big_project();
    let pipeline = std::fs::read_to_string(a.path().join("pipeline.toml")).unwrap();
    a.write_pipeline(&format!(
        "remote = \"{}\"\n{pipeline}\n[nodes.token_stats]\nstage = \"token-stats\"\ninputs.tokens = \"tokens\"\n",
        server.url("away")
    ));
    // Over a slow link, the write-through upload takes seconds: the server goes away
    // in the middle of it.
    let link = SlowLink::start(server.port, 4 << 20);
    let mut env = server.env();
    env[0].1 = link.endpoint();
    env.push(("CACHEMONEY_REMOTE_PART_SIZE", "5M".into()));
    let child = a.spawn_with(&env, &["run"]);
    wait_for_a_part(&server);
    server.stop();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(
            "node 'tokens': cannot push: remote s3://cachemoney/away: cannot reach the server"
        ),
        "{stderr}"
    );
    // What was built is committed here, and whole.
    a.ok(&["verify"]);
    let offline = a.ok(&["--offline", "run"]);
    assert!(
        offline.contains("tokens") && offline.contains("reused"),
        "{offline}"
    );
    // Without --offline, the pipeline's remote is required.
    let error = a.fails_with(&server.env(), &["status"]);
    assert!(
        error.contains("cannot reach the server") && error.contains("--offline"),
        "{error}"
    );

    // Back again: the next run uploads what the failed one could not.
    server.restart();
    let env = server.env();
    a.ok_with(&env, &["run"]);
    assert_eq!(manifest_keys(&server, "away").len(), 2);
}

#[test]
fn wrong_credentials_and_a_missing_bucket_fail_in_one_line_before_anything_runs() {
    let server = S3Server::start();
    let p = project_with_remote(&server.url("p"));
    let before = p.store_snapshot();
    let mut wrong = server.env();
    wrong[2].1 = "not-the-secret".into();
    let error = p.fails_with(&wrong, &["run"]);
    assert!(
        error.contains("remote s3://cachemoney/p: access denied"),
        "{error}"
    );
    assert!(error.contains("AWS_SECRET_ACCESS_KEY"), "{error}");

    let env = server.env();
    let error = p.fails_with(&env, &["--remote", "s3://no-such-bucket/p", "run"]);
    assert!(
        error.contains("remote s3://no-such-bucket/p: the bucket does not exist"),
        "{error}"
    );
    let error = p.fails_with(&env, &["--remote", "not a url", "status"]);
    assert!(error.contains("remote 'not a url': not a URL"), "{error}");
    assert_eq!(
        p.store_snapshot(),
        before,
        "a failed remote changed the store"
    );

    let plain = Project::small();
    let error = plain.fails_with(&env, &["push"]);
    assert!(error.contains("push: no remote"), "{error}");
    let error = p.fails_with(&env, &["remote", "gc"]);
    assert!(error.contains("only --dry-run"), "{error}");
}

/// A reader without write permission reads through the remote: what is there is pulled,
/// what is not is built here and kept here, with one line saying nothing is pushed.
#[test]
fn a_read_only_remote_is_read_through_and_nothing_is_pushed() {
    let server = S3Server::start();
    let a = project_with_remote(&server.url("p"));
    a.ok_with(&server.env(), &["run", "--until", "tokens"]);
    let held = server.objects("p");
    let reader = server.read_only_env();
    let b = second_machine(&a);
    let out = b.run_with(&reader, &["run"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("tokens") && l.contains("pulled")),
        "{stdout}"
    );
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("nothing is pushed"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains(&server.url("p")), "{stderr}");
    assert_eq!(
        server.objects("p"),
        held,
        "a read-only key wrote to the remote"
    );
    b.ok(&["verify"]);
    // Reading goes on working: status and a second run (nothing to push, nothing said).
    b.ok_with(&reader, &["status"]);
    let again = b.run_with(&reader, &["run"]);
    assert!(again.status.success());
    // An explicit push says why it cannot.
    let line = b.fails_with(&reader, &["push"]);
    assert!(
        line.contains("denied") || line.contains("permission"),
        "{line}"
    );
}
