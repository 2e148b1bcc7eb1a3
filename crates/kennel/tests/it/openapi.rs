//! The API's contract as a client reads it: the OpenAPI document the real binary serves says
//! where each parameter goes, what it may hold and every status an operation can answer, and
//! the server refuses what the document calls invalid. Also the lockout guard on admin keys
//! and `kennel keys recover`, which mints an admin key when none is left.
//!
//! `scripts/api-check` holds the document to the server's behaviour with generated requests
//! (schemathesis); these tests pin what a reader of the document relies on.

use std::path::Path;
use std::process::Output;

use anyhow::{bail, Context};
use kennel_proto::api::{ApiKey, CreatedKey, Scope};
use kennel_testkit::server::isolated_command;
use kennel_testkit::{within, Api, EventStream, Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{bin, server, server_with, task, WAIT};

/// Every operation of the document: (method, path, operation object).
fn operations(spec: &Value) -> Vec<(String, String, Value)> {
    let mut ops = Vec::new();
    for (path, item) in spec["paths"].as_object().into_iter().flatten() {
        for (method, op) in item.as_object().into_iter().flatten() {
            ops.push((method.clone(), path.clone(), op.clone()));
        }
    }
    ops
}

fn param<'a>(op: &'a Value, name: &str) -> Option<&'a Value> {
    op["parameters"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

#[tokio::test]
async fn the_document_puts_parameters_where_they_are_and_documents_every_status(
) -> anyhow::Result<()> {
    let srv = server_with("[server.api]\nmax_page = 200\n").await?;
    let spec: Value = srv.api().get("/api/openapi.json").await?;
    let ops = operations(&spec);
    assert!(ops.len() >= 20, "{} operations", ops.len());
    for (method, path, op) in &ops {
        let at = format!("{method} {path}");
        for p in op["parameters"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or_default();
            let is_template = path.contains(&format!("{{{name}}}"));
            match p["in"].as_str() {
                Some("path") => assert!(is_template, "{at}: `{name}` is not in the path"),
                Some("query") | Some("header") => {
                    assert!(
                        !is_template,
                        "{at}: path segment `{name}` is not a path parameter"
                    );
                    assert_ne!(p["required"], true, "{at}: `{name}` is optional");
                    let ty = &p["schema"]["type"];
                    assert!(!ty.is_array(), "{at}: `{name}` is never null: {ty}");
                }
                other => panic!("{at}: `{name}` is in {other:?}"),
            }
        }
        for segment in path.split('/').filter(|s| s.starts_with('{')) {
            let name = segment.trim_matches(|c| c == '{' || c == '}');
            let p = param(op, name).with_context(|| format!("{at}: no parameter `{name}`"))?;
            assert_eq!(p["in"], "path", "{at}");
            assert_eq!(p["schema"]["maxLength"], 128, "{at}: {p}");
            assert!(p["schema"]["pattern"].is_string(), "{at}: {p}");
        }
        let open = op["security"] == serde_json::json!([{}]);
        let responses = &op["responses"];
        if open {
            // The join-token exchange's token is its credential.
            assert!(
                ["/health", "/ready", "/api/v1/agent-tokens/exchange"].contains(&path.as_str()),
                "{at} needs no key?"
            );
        } else {
            for status in ["401", "403", "503"] {
                assert_eq!(
                    responses[status]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ErrorBody",
                    "{at} does not document {status}"
                );
            }
        }
        let takes_input = op["requestBody"].is_object()
            || op["parameters"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["in"] != "header"));
        if takes_input {
            assert!(responses["400"].is_object(), "{at} does not document 400");
        }
        if op["requestBody"].is_object() {
            assert!(responses["413"].is_object(), "{at} does not document 413");
        }
        if path.contains("{id}") {
            assert!(responses["404"].is_object(), "{at} does not document 404");
        }
    }

    // The page sizes, with the bounds the server enforces (this one's max_page is 200).
    let list = &spec["paths"]["/api/v1/tasks"]["get"];
    let limit = param(list, "limit").context("GET /api/v1/tasks has no limit")?;
    assert_eq!(limit["in"], "query");
    assert_eq!(
        (&limit["schema"]["minimum"], &limit["schema"]["maximum"]),
        (&Value::from(1), &Value::from(200)),
        "{limit}"
    );
    let output = &spec["paths"]["/api/v1/tasks/{id}/output"]["get"];
    let limit = param(output, "limit").context("GET .../output has no limit")?;
    assert_eq!(limit["in"], "query");
    assert_eq!(
        (&limit["schema"]["minimum"], &limit["schema"]["maximum"]),
        (&Value::from(1), &Value::from(1000)),
        "{limit}"
    );
    // Query parameters of the lists and streams are declared as query parameters.
    for (path, names) in [
        (
            "/api/v1/tasks",
            &["status", "daemon", "limit", "cursor"][..],
        ),
        (
            "/api/v1/tasks/{id}/output",
            &["attempt", "after_seq", "limit"],
        ),
        (
            "/api/v1/tasks/{id}/output/stream",
            &["attempt", "after_seq"],
        ),
        ("/api/v1/events", &["after", "task"]),
    ] {
        for name in names {
            let p = param(&spec["paths"][path]["get"], name)
                .with_context(|| format!("{path} has no `{name}`"))?;
            assert_eq!(p["in"], "query", "{path} {name}");
        }
    }
    // The body limits match what the server checks.
    let create = &spec["components"]["schemas"]["CreateTask"]["properties"];
    assert_eq!(
        (&create["name"]["minLength"], &create["name"]["maxLength"]),
        (&Value::from(1), &Value::from(200))
    );
    assert_eq!(create["maxAttempts"]["maximum"], 100);
    assert_eq!(create["labels"]["maxProperties"], 64);
    assert_eq!(
        spec["components"]["schemas"]["CreateKey"]["properties"]["scopes"]["minItems"],
        1
    );
    // The server refuses what the document calls too large.
    let (status, body) = srv
        .api()
        .raw(
            Method::GET,
            "/api/v1/tasks?limit=201",
            Some(srv.admin_key()),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("pass 1 to 200"), "{body}");
    Ok(())
}

#[tokio::test]
async fn bad_query_values_are_refused_not_clamped_or_ignored() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let key = srv.admin_key().to_string();
    let t = api.submit(&task("q")).await?;
    let out = format!("/api/v1/tasks/{}/output", t.id);
    let refused = [
        ("/api/v1/tasks?limit=0".to_string(), "pass 1 to 1000"),
        ("/api/v1/tasks?limit=1001".into(), "pass 1 to 1000"),
        ("/api/v1/tasks?limit=-1".into(), "limit"),
        ("/api/v1/tasks?limit=".into(), "limit"),
        ("/api/v1/tasks?cursor=".into(), "invalid cursor"),
        ("/api/v1/tasks?cursor=-5".into(), "invalid cursor"),
        ("/api/v1/tasks?status=".into(), "unknown task status"),
        ("/api/v1/tasks?daemon=".into(), "invalid daemon id"),
        ("/api/v1/tasks?sort=name".into(), "unknown field `sort`"),
        (format!("{out}?limit=0"), "pass 1 to 1000"),
        (format!("{out}?limit=5000"), "pass 1 to 1000"),
        (format!("{out}?attempt=0"), "counts from 1"),
        (format!("{out}?after_seq=-1"), "after_seq"),
        (format!("{out}?after_seq=9223372036854775808"), "at most"),
        ("/api/v1/events?after=".into(), "after"),
        ("/api/v1/events?after=-1".into(), "`after` must be"),
        ("/api/v1/events?task=..".into(), "invalid task id"),
        ("/api/v1/tasks/..x".into(), "invalid task id"),
    ];
    for (path, want) in refused {
        let (status, body) = api.raw(Method::GET, &path, Some(&key), None).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(body.contains(want), "{path}: {body}");
        assert!(body.contains("\"invalidRequest\""), "{path}: {body}");
    }
    for path in [
        "/api/v1/tasks?limit=1".to_string(),
        "/api/v1/tasks?limit=1000&status=queued".into(),
        format!("{out}?limit=1000&attempt=1&after_seq=0"),
    ] {
        let (status, body) = api.raw(Method::GET, &path, Some(&key), None).await?;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    // `3.0` is an integer to JSON Schema, so the server takes it as one.
    let (status, body) = api
        .raw(
            Method::POST,
            "/api/v1/tasks",
            Some(&key),
            Some(r#"{"name":"f","prompt":"p","agent":"command","maxAttempts":2.0}"#.into()),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Streams refuse a malformed Last-Event-ID instead of starting from the beginning.
    let events = format!("{}/api/v1/events", srv.url());
    let stream = format!("{}/api/v1/tasks/{}/output/stream", srv.url(), t.id);
    for (url, last) in [
        (&events, "-5"),
        (&events, "x"),
        (&stream, "1:-2"),
        (&stream, "7"),
    ] {
        let err = match EventStream::connect(url, Some(&key), Some(last)).await {
            Ok(_) => bail!("{url} accepted Last-Event-ID `{last}`"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("400") && err.contains("Last-Event-ID"),
            "{err}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// No lockout: the last admin key stays, and `kennel keys recover` mints one when none is left.

async fn keys(api: &Api) -> anyhow::Result<Vec<ApiKey>> {
    api.get("/api/v1/keys").await
}

/// The id of the only live admin key.
async fn only_admin(api: &Api) -> anyhow::Result<String> {
    let admins: Vec<ApiKey> = keys(api)
        .await?
        .into_iter()
        .filter(|k| k.revoked_at.is_none() && k.scopes.contains(&Scope::Admin))
        .collect();
    match admins.as_slice() {
        [one] => Ok(one.id.clone()),
        other => bail!("expected one live admin key, found {other:?}"),
    }
}

#[tokio::test]
async fn the_last_admin_key_cannot_be_revoked() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let id = only_admin(&api).await?;
    let (status, body) = api
        .raw(
            Method::DELETE,
            &format!("/api/v1/keys/{id}"),
            Some(srv.admin_key()),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body.contains("last live admin key")
            && body.contains("Create another admin key first")
            && body.contains("kennel keys create --name NAME --scope admin"),
        "{body}"
    );
    // The CLI says the same, and fails.
    let out = Command::new(bin())
        .args(["keys", "revoke", &id])
        .env("KENNEL_URL", srv.url())
        .env("KENNEL_API_KEY", srv.admin_key())
        .env_remove("KENNEL_CONFIG")
        .kill_on_drop(true)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Create another admin key first"),
        "{stderr}"
    );
    // Nothing changed: the key still works.
    assert_eq!(only_admin(&api).await?, id);
    Ok(())
}

#[tokio::test]
async fn with_two_admin_keys_one_can_be_revoked() -> anyhow::Result<()> {
    let srv = server().await?;
    let api = srv.api();
    let first = only_admin(&api).await?;
    let second: CreatedKey = api.create_key("second admin", &[Scope::Admin]).await?;
    // A client key does not count as an admin.
    api.create_key("ci", &[Scope::Client]).await?;
    let revoked: ApiKey = api.delete(&format!("/api/v1/keys/{first}")).await?;
    assert!(revoked.revoked_at.is_some());
    let (status, _) = api
        .raw(Method::GET, "/api/v1/keys", Some(srv.admin_key()), None)
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let second_api = api.with_key(Some(second.key.clone()));
    assert_eq!(only_admin(&second_api).await?, second.info.id);
    // Now the second is the last one.
    let (status, body) = second_api
        .raw(
            Method::DELETE,
            &format!("/api/v1/keys/{}", second.info.id),
            Some(&second.key),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    Ok(())
}

/// `kennel keys recover` on `data_dir`, isolated from the developer's settings.
async fn recover(data_dir: &Path, envs: &[(&str, &str)]) -> anyhow::Result<Output> {
    let mut cmd = isolated_command(bin());
    cmd.args(["keys", "recover", "--data-dir"])
        .arg(data_dir)
        .envs(envs.iter().copied())
        .stderr(std::process::Stdio::piped());
    within(WAIT, "kennel keys recover", cmd.output())
        .await?
        .context("failed to run kennel keys recover")
}

/// The key `kennel keys recover` printed, after checking that it succeeded and saved it.
fn recovered_key(out: &Output, data_dir: &Path) -> anyhow::Result<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(key.starts_with("kn_"), "{key}");
    assert!(stderr.contains("admin.key"), "{stderr}");
    let path = data_dir.join("admin.key");
    assert_eq!(std::fs::read_to_string(&path)?.trim(), key);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path)?.permissions().mode() & 0o777,
        0o600
    );
    Ok(key)
}

/// `kennel server` on `data_dir` with no admin key configured, as a first real start is.
async fn plain_server(data_dir: &Path) -> anyhow::Result<(Child, String)> {
    let mut cmd = isolated_command(bin());
    cmd.args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir);
    let mut child = cmd.spawn().context("failed to start kennel server")?;
    let stdout = child.stdout.take().context("stdout was not captured")?;
    let mut lines = BufReader::new(stdout).lines();
    let url = within(WAIT, "the listening line", async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("kennel: listening on ") {
                return Ok(rest.trim().to_string());
            }
        }
        bail!("kennel server exited before it listened; its stderr is above")
    })
    .await??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, url))
}

/// Locks every admin out the way it happens: a second admin key revokes the first, then the
/// second is lost. Returns nothing usable, on purpose.
async fn lock_out(api: &Api) -> anyhow::Result<()> {
    let first = only_admin(api).await?;
    let second: CreatedKey = api.create_key("soon lost", &[Scope::Admin]).await?;
    let (status, body) = api
        .with_key(Some(second.key))
        .raw(
            Method::DELETE,
            &format!("/api/v1/keys/{first}"),
            api.key(),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    Ok(())
}

#[tokio::test]
async fn recovery_on_a_stopped_server_mints_a_key_that_works_after_restart() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("kennel-test-recover-")
        .tempdir()?;
    let data = dir.path().join("data");
    let (mut child, url) = plain_server(&data).await?;
    let first = std::fs::read_to_string(data.join("admin.key"))?
        .trim()
        .to_string();
    let api = Api::new(url.clone(), Some(first.clone()));
    lock_out(&api).await?;
    let (status, _) = api
        .raw(Method::GET, "/api/v1/keys", Some(&first), None)
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "locked out");
    child.kill().await?;

    // Wrong directory: says what to pass.
    let out = recover(&dir.path().join("nowhere"), &[]).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no kennel database") && stderr.contains("--data-dir"),
        "{stderr}"
    );

    let out = recover(&data, &[]).await?;
    let key = recovered_key(&out, &data)?;
    let (_child, url) = plain_server(&data).await?;
    let recovered = Api::new(url.clone(), Some(key.clone()));
    let listed = keys(&recovered).await?;
    let mine = listed
        .iter()
        .find(|k| key.contains(&k.id))
        .context("the recovered key is not listed")?;
    assert!(mine.name.starts_with("recovered admin"), "{mine:?}");
    assert_eq!(mine.scopes, vec![Scope::Admin]);
    // The CLI finds it in admin.key by itself.
    let out = isolated_command(bin())
        .args(["keys", "list"])
        .env("KENNEL_URL", &url)
        .env("KENNEL_SERVER__DATA_DIR", &data)
        .output()
        .await?;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&mine.id));
    Ok(())
}

#[tokio::test]
async fn recovery_on_a_running_server_works_at_once() -> anyhow::Result<()> {
    let mut srv = server().await?;
    let api = srv.api();
    lock_out(&api).await?;
    let admin_key = srv.admin_key().to_string();
    let configured = [("KENNEL_SERVER__AUTH__ADMIN_KEY", admin_key.as_str())];
    let out = recover(srv.data_dir(), &configured).await?;
    let key = recovered_key(&out, srv.data_dir())?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server.auth.admin_key") && stderr.contains("revoked"),
        "{stderr}"
    );
    // The running server takes it without a restart.
    let recovered = api.with_key(Some(key.clone()));
    assert!(keys(&recovered).await?.iter().any(|k| key.contains(&k.id)));
    recovered.submit(&task("after recovery")).await?;

    // A revoked configured admin key is never re-activated: the server refuses to start and
    // says what to do.
    srv.kill9().await?;
    let mut cmd = isolated_command(bin());
    cmd.args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(srv.data_dir())
        .env("KENNEL_SERVER__AUTH__ADMIN_KEY", configured[0].1)
        .stderr(std::process::Stdio::piped());
    let out = within(WAIT, "the refused start", cmd.output()).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("configured admin key")
            && stderr.contains("revoked")
            && stderr.contains("kennel keys recover"),
        "{stderr}"
    );
    Ok(())
}
