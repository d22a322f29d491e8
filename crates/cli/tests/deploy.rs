//! The deployment artefacts checked without a cluster: Prometheus rules (`promtool check` and
//! `promtool test`), the scrape config, the NATS configuration, the Kubernetes manifests and
//! the systemd unit, the Grafana dashboards; and, against a real Prometheus scraping a
//! running `tandem demo`, that every dashboard query returns data and every metric the
//! rules and dashboards use is exported by the binary with the labels they use.
//!
//! `promtool`, `prometheus`, `nats-server` and `systemd-analyze` come from
//! `scripts/setup-test-deps`; `openssl` (which generates throwaway TLS files for the NATS
//! and sink configurations) from the base system. A test that cannot find one fails and
//! says so.
// Waits for external processes (socat, Prometheus) on the real clock, by design.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn deploy(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

/// A tool the test setup installs; missing is a failure, never a skip.
fn tool(name: &str) -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: run scripts/setup-test-deps"))
}

/// Runs `cmd` and fails with its output unless it succeeded.
fn succeed(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

/// `v` at a slash-separated path of keys (or array indices), failing with the file's name.
fn at<'a>(v: &'a Value, path: &str, what: &str) -> &'a Value {
    let found = path
        .split('/')
        .try_fold(v, |v, key| match key.parse::<usize>() {
            Ok(i) => v.get(i),
            Err(_) => v.get(key),
        });
    found.unwrap_or_else(|| panic!("{what}: missing {path}"))
}

fn text<'a>(v: &'a Value, path: &str, what: &str) -> &'a str {
    at(v, path, what)
        .as_str()
        .unwrap_or_else(|| panic!("{what}: {path} is not a string"))
}

// ---------------------------------------------------------------------------- Prometheus

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = tool("promtool");
    let out = succeed(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(deploy("prometheus/rules.yml")),
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    // The unit tests fire and resolve the pair's alerts (imbalance across two consumers
    // among them) from series of two consumers.
    let out = succeed(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(deploy("prometheus/rules_test.yml")),
    );
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let tests = std::fs::read_to_string(deploy("prometheus/rules_test.yml")).unwrap();
    for alert in alert_names() {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "rules_test.yml has no test for {alert}"
        );
    }
    succeed(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(deploy("prometheus/prometheus.yml")),
    );
}

/// Every alert of rules.yml.
fn alert_names() -> Vec<String> {
    rule_exprs()
        .into_iter()
        .filter_map(|(name, _)| name.strip_prefix("alert ").map(str::to_owned))
        .collect()
}

/// (`alert NAME` or `record NAME`, expression) of every rule in rules.yml.
fn rule_exprs() -> Vec<(String, String)> {
    let what = "rules.yml";
    let doc = &yaml_docs(&deploy("prometheus/rules.yml"))[0];
    let mut out = Vec::new();
    for group in at(doc, "groups", what).as_array().unwrap() {
        for rule in at(group, "rules", what).as_array().unwrap() {
            let name = match (rule.get("alert"), rule.get("record")) {
                (Some(a), _) => format!("alert {}", a.as_str().unwrap()),
                (_, Some(r)) => format!("record {}", r.as_str().unwrap()),
                _ => panic!("{what}: a rule with neither alert nor record"),
            };
            out.push((name, text(rule, "expr", what).to_owned()));
        }
    }
    out
}

// ---------------------------------------------------------------------------- NATS

/// Throwaway TLS files in `dir`, named as the Secret nats-tls names them: a self-signed
/// certificate for the NATS servers' names (`tls.crt`, its key `tls.key`), which is also
/// its own CA (`ca.crt`).
fn tls_files(dir: &Path) {
    succeed(
        Command::new(tool("openssl"))
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args(["-subj", "/CN=nats.tandem.svc"])
            .args(["-addext", "subjectAltName=DNS:*.nats.tandem.svc"])
            .arg("-keyout")
            .arg(dir.join("tls.key"))
            .arg("-out")
            .arg(dir.join("tls.crt")),
    );
    std::fs::copy(dir.join("tls.crt"), dir.join("ca.crt")).unwrap();
}

/// Every `cert_file`, `key_file` and `ca_file` of a NATS configuration, and how many `tls`
/// blocks hold them.
fn nats_tls_paths(conf: &str) -> (usize, Vec<(String, String)>) {
    let blocks = conf
        .lines()
        .filter(|l| l.trim_start().starts_with("tls {"))
        .count();
    let paths = conf
        .lines()
        .filter_map(|l| {
            let (key, value) = l.trim().split_once(':')?;
            ["cert_file", "key_file", "ca_file"]
                .contains(&key)
                .then(|| (key.to_owned(), value.trim().trim_matches('"').to_owned()))
        })
        .collect();
    (blocks, paths)
}

/// The NATS configuration is valid for `nats-server -t` with its TLS files where the
/// StatefulSet mounts the Secret nats-tls (the mount's path is replaced by a directory of
/// generated files, since `-t` opens them), and the stream outlasts the dedup window.
#[test]
fn nats_configuration_is_valid_and_the_stream_outlasts_the_dedup_window() {
    let conf = std::fs::read_to_string(deploy("nats/nats-server.conf")).unwrap();
    let all = manifests();
    let (mount, _) = nats_tls_mount(&all);
    let dir = tempfile::tempdir().unwrap();
    tls_files(dir.path());
    let local = dir.path().join("nats-server.conf");
    let with_files = conf.replace(&format!("{mount}/"), &format!("{}/", dir.path().display()));
    assert_ne!(
        with_files, conf,
        "the configuration names files under {mount}"
    );
    std::fs::write(&local, with_files).unwrap();
    succeed(
        Command::new(tool("nats-server"))
            .env("SERVER_NAME", "nats-0")
            .env("ZONE", "a")
            .env("NATS_TOKEN", "from-the-secret")
            .arg("-t")
            .arg("-c")
            .arg(&local),
    );
    let stream: Value =
        serde_json::from_slice(&std::fs::read(deploy("nats/stream.json")).unwrap()).unwrap();
    let what = "nats/stream.json";
    assert_eq!(at(&stream, "num_replicas", what), 3, "one replica per zone");
    for zone in ["a", "b"] {
        let cfg = zone_config(zone);
        let sink = &cfg["sinks"]["jetstream"];
        assert_eq!(sink["stream"].as_str(), Some(text(&stream, "name", what)));
        let window_ns = at(&stream, "duplicate_window", what).as_u64().unwrap();
        let configured = sink["duplicate_window_secs"].as_integer().unwrap() as u64;
        assert_eq!(
            window_ns,
            configured * 1_000_000_000,
            "zone {zone}: same window"
        );
        let dedup = cfg["merge"]["dedup_window_secs"].as_integer().unwrap() as u64;
        assert!(
            configured > dedup,
            "duplicate window must exceed the dedup window"
        );
        let prefix = sink
            .get("subject_prefix")
            .and_then(|v| v.as_str())
            .unwrap_or("tandem");
        let subjects = at(&stream, "subjects", what).as_array().unwrap();
        assert!(
            subjects
                .iter()
                .any(|s| s.as_str() == Some(&format!("{prefix}.>"))),
            "the stream takes the consumers' subjects"
        );
    }
}

// ---------------------------------------------------------------------------- Kubernetes

/// The StatefulSet of the NATS servers: its pod spec and its container.
fn nats_servers(all: &[(String, Value)]) -> (&Value, &Value) {
    let sts = named(all, "StatefulSet", "nats").expect("a StatefulSet named nats");
    let pod = at(sts, "spec/template/spec", "StatefulSet nats");
    (pod, at(pod, "containers/0", "StatefulSet nats"))
}

/// Where the NATS servers mount the Secret of their TLS files: (mount path, Secret name).
fn nats_tls_mount(all: &[(String, Value)]) -> (String, String) {
    let (pod, c) = nats_servers(all);
    let mounts = c["volumeMounts"].as_array().unwrap();
    let found: Vec<(String, String)> = mounts
        .iter()
        .filter_map(|m| {
            let volume = pod["volumes"]
                .as_array()?
                .iter()
                .find(|v| v["name"] == m["name"])?;
            let secret = volume["secret"]["secretName"].as_str()?;
            Some((m["mountPath"].as_str()?.to_owned(), secret.to_owned()))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "one Secret volume, the TLS files: {found:?}"
    );
    found.into_iter().next().unwrap()
}

/// The keys a Secret defines (`stringData` or `data`).
fn secret_keys(all: &[(String, Value)], name: &str) -> BTreeSet<String> {
    let secret = named(all, "Secret", name).unwrap_or_else(|| panic!("no Secret {name}"));
    ["stringData", "data"]
        .iter()
        .filter_map(|field| secret[*field].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect()
}

/// The Secret and key behind the file `path` in `container` of `pod`, through a `secret`
/// or `projected` volume mounted above it.
fn secret_file(pod: &Value, container: &Value, path: &str) -> Option<(String, String)> {
    let path = Path::new(path);
    for m in container["volumeMounts"].as_array()? {
        let Ok(rel) = path.strip_prefix(m["mountPath"].as_str()?) else {
            continue;
        };
        let rel = rel.to_str()?;
        let volume = pod["volumes"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == m["name"])?;
        let sources: Vec<&Value> = match (volume.get("secret"), volume.get("projected")) {
            (Some(secret), _) => vec![secret],
            (_, Some(projected)) => projected["sources"]
                .as_array()?
                .iter()
                .filter_map(|s| s.get("secret"))
                .collect(),
            _ => continue,
        };
        for source in sources {
            let name = source
                .get("secretName")
                .or_else(|| source.get("name"))?
                .as_str()?
                .to_owned();
            match source["items"].as_array() {
                Some(items) => {
                    if let Some(item) = items.iter().find(|i| i["path"] == rel) {
                        return Some((name, item["key"].as_str()?.to_owned()));
                    }
                }
                None => return Some((name, rel.to_owned())),
            }
        }
    }
    None
}

/// Host names of a comma-separated list of URLs, each with its scheme.
fn url_hosts(urls: &str) -> Vec<(String, String)> {
    urls.split(',')
        .map(|u| {
            let (scheme, rest) = u.trim().split_once("://").unwrap();
            let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
            (scheme.to_owned(), host.to_owned())
        })
        .collect()
}

/// TLS and the token hang together across the NATS configuration, the Secrets, the NATS
/// StatefulSet and the consumers: the servers read every TLS file (for clients and for
/// routes) from the Secret they mount, and the token from a Secret; each zone's sink
/// requires TLS with the StatefulSet's servers (the names the routes use), trusts the CA
/// of that same Secret and presents the token of that same Secret, both mounted where its
/// configuration reads them, without the servers' private key; only the consumers reach
/// the client port.
#[test]
fn nats_tls_and_token_hang_together() {
    let all = manifests();
    let what = "nats";
    let conf = std::fs::read_to_string(deploy("nats/nats-server.conf")).unwrap();
    let (mount, tls_secret) = nats_tls_mount(&all);
    let tls_keys = secret_keys(&all, &tls_secret);
    let (blocks, paths) = nats_tls_paths(&conf);
    assert_eq!(blocks, 2, "TLS for clients and for routes");
    assert_eq!(paths.len(), 6, "{paths:?}");
    let mut ca_key = None;
    for (field, path) in &paths {
        let key = path
            .strip_prefix(&format!("{mount}/"))
            .unwrap_or_else(|| panic!("{field} {path} is not in the Secret mounted at {mount}"));
        assert!(
            tls_keys.contains(key),
            "{field}: Secret {tls_secret} has no {key} ({tls_keys:?})"
        );
        if field == "ca_file" {
            ca_key = Some(key.to_owned());
        }
    }
    let ca_key = ca_key.unwrap();

    let (nats_pod, nats) = nats_servers(&all);
    assert!(
        conf.contains("token: $NATS_TOKEN"),
        "the servers require a token"
    );
    let token_env = nats["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "NATS_TOKEN")
        .expect("NATS_TOKEN in the servers' environment");
    let token_secret = (
        text(token_env, "valueFrom/secretKeyRef/name", what).to_owned(),
        text(token_env, "valueFrom/secretKeyRef/key", what).to_owned(),
    );
    assert!(secret_keys(&all, &token_secret.0).contains(&token_secret.1));

    // The configuration is the ConfigMap made from nats-server.conf, where --config reads it.
    let args: Vec<&str> = nats["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let config_path = Path::new(args[args.iter().position(|a| *a == "--config").unwrap() + 1]);
    assert_eq!(config_path.file_name().unwrap(), "nats-server.conf");
    let config_mount = nats["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| Path::new(m["mountPath"].as_str().unwrap()) == config_path.parent().unwrap())
        .expect("the configuration's directory is mounted");
    assert!(
        nats_pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == config_mount["name"] && v["configMap"]["name"].is_string()),
        "from a ConfigMap"
    );

    // The servers: the StatefulSet's pods under its headless Service, as the routes name them.
    let sts = named(&all, "StatefulSet", "nats").unwrap();
    let service = text(sts, "spec/serviceName", what);
    let svc = named(&all, "Service", service).expect("the StatefulSet's Service");
    assert_eq!(text(svc, "spec/clusterIP", what), "None", "headless");
    let replicas = at(sts, "spec/replicas", what).as_u64().unwrap();
    let servers: BTreeSet<String> = (0..replicas)
        .map(|i| format!("nats-{i}.{service}.tandem.svc"))
        .collect();
    let routes: BTreeSet<String> = conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nats-route://"))
        .map(|r| r.rsplit_once(':').unwrap().0.to_owned())
        .collect();
    assert_eq!(routes, servers, "the routes name the StatefulSet's servers");

    let deployments = of_kind(&all, "Deployment");
    assert_eq!(deployments.len(), 2);
    for d in &deployments {
        let what = format!("Deployment {}", d["metadata"]["name"]);
        let what = what.as_str();
        let pod = at(d, "spec/template/spec", what);
        let c = at(pod, "containers/0", what);
        let cm_name = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|v| v["configMap"]["name"].as_str())
            .unwrap();
        let cfg: toml::Table = text(
            named(&all, "ConfigMap", cm_name).unwrap(),
            "data/tandem.toml",
            what,
        )
        .parse()
        .unwrap();
        let sink_name = cfg["stream"][0]["sink"].as_str().unwrap();
        let sink = &cfg["sinks"][sink_name];
        assert_eq!(sink["kind"].as_str(), Some("nats"), "{what}");
        let hosts = url_hosts(sink["url"].as_str().unwrap());
        assert!(
            hosts.iter().all(|(scheme, _)| scheme == "tls"),
            "{what}: every server over TLS: {hosts:?}"
        );
        let named_servers: BTreeSet<String> = hosts.into_iter().map(|(_, h)| h).collect();
        assert_eq!(
            named_servers, servers,
            "{what}: the sink names every server"
        );
        let ca = sink["tls_ca_file"].as_str().expect("tls_ca_file");
        assert_eq!(
            secret_file(pod, c, ca),
            Some((tls_secret.clone(), ca_key.clone())),
            "{what}: tls_ca_file {ca} is the servers' CA from Secret {tls_secret}"
        );
        assert!(
            sink.get("token_env").is_none(),
            "{what}: the token comes from its file"
        );
        let token = sink["token_file"].as_str().expect("token_file");
        assert_eq!(
            secret_file(pod, c, token),
            Some(token_secret.clone()),
            "{what}: token_file {token} is the servers' token"
        );
        // The consumers get the CA of the TLS Secret, never the servers' key.
        for v in pod["volumes"].as_array().unwrap() {
            let sources: Vec<&Value> = match (v.get("secret"), v.get("projected")) {
                (Some(s), _) => vec![s],
                (_, Some(p)) => p["sources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|s| s.get("secret"))
                    .collect(),
                _ => vec![],
            };
            for s in sources {
                let name = s.get("secretName").or_else(|| s.get("name")).unwrap();
                if name == tls_secret.as_str() {
                    let items = s["items"]
                        .as_array()
                        .expect("only some keys of the TLS Secret");
                    assert!(
                        items.iter().all(|i| i["key"] == ca_key.as_str()),
                        "{what}: mounts more than the CA of {tls_secret}: {items:?}"
                    );
                }
            }
        }
    }

    // Only the consumers reach the client port.
    let policy = named(&all, "NetworkPolicy", "nats").expect("a NetworkPolicy named nats");
    let what = "NetworkPolicy nats";
    assert!(labels_match(
        at(policy, "spec/podSelector/matchLabels", what),
        at(sts, "spec/template/metadata/labels", what)
    ));
    let client_rules: Vec<&Value> = at(policy, "spec/ingress", what)
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["ports"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["port"] == 4222))
        })
        .collect();
    assert!(!client_rules.is_empty(), "{what}: a rule for port 4222");
    for rule in client_rules {
        for from in rule["from"]
            .as_array()
            .expect("a rule that names its peers")
        {
            let selector = &from["podSelector"]["matchLabels"];
            assert!(from.get("namespaceSelector").is_none() && from.get("ipBlock").is_none());
            for d in &deployments {
                assert!(labels_match(
                    selector,
                    &d["spec"]["template"]["metadata"]["labels"]
                ));
            }
            assert!(!labels_match(
                selector,
                at(sts, "spec/template/metadata/labels", what)
            ));
        }
    }
}

/// Every document under deploy/k8s, with the file it came from.
fn manifests() -> Vec<(String, Value)> {
    let mut files: Vec<_> = std::fs::read_dir(deploy("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .iter()
        .flat_map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            yaml_docs(p).into_iter().map(move |d| (name.clone(), d))
        })
        .collect()
}

fn of_kind<'a>(all: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    all.iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d)
        .collect()
}

fn named<'a>(all: &'a [(String, Value)], kind: &str, name: &str) -> Option<&'a Value> {
    of_kind(all, kind)
        .into_iter()
        .find(|d| d["metadata"]["name"] == name)
}

/// The `tandem.toml` of a zone's ConfigMap.
fn zone_config(zone: &str) -> toml::Table {
    let all = manifests();
    let cm = named(&all, "ConfigMap", &format!("tandem-zone-{zone}"))
        .unwrap_or_else(|| panic!("no ConfigMap tandem-zone-{zone}"));
    text(cm, "data/tandem.toml", "ConfigMap")
        .parse()
        .expect("the ConfigMap's tandem.toml is TOML")
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

#[test]
fn kubernetes_manifests_parse_and_hang_together() {
    let all = manifests();
    assert!(!all.is_empty());
    for (file, d) in &all {
        let what = format!("{file} ({})", d["kind"]);
        text(d, "apiVersion", &what);
        let kind = text(d, "kind", &what);
        text(d, "metadata/name", &what);
        if kind != "Namespace" {
            assert_eq!(text(d, "metadata/namespace", &what), "tandem", "{what}");
        }
    }
    let deployments = of_kind(&all, "Deployment");
    assert_eq!(deployments.len(), 2, "one consumer per zone");
    let mut zones = BTreeSet::new();
    for d in &deployments {
        let what = format!("Deployment {}", d["metadata"]["name"]);
        let what = what.as_str();
        assert_eq!(at(d, "spec/replicas", what), 1, "{what}");
        assert_eq!(text(d, "spec/strategy/type", what), "Recreate", "{what}");
        assert!(
            labels_match(
                at(d, "spec/selector/matchLabels", what),
                at(d, "spec/template/metadata/labels", what)
            ),
            "{what}: the selector matches the pod template"
        );
        let term = at(
            d,
            "spec/template/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms/0/matchExpressions/0",
            what,
        );
        assert_eq!(text(term, "key", what), "topology.kubernetes.io/zone");
        zones.insert(term["values"].to_string());

        let pod = at(d, "spec/template/spec", what);
        let c = at(pod, "containers/0", what);
        text(c, "image", what);
        let port = text(c, "ports/0/name", what);
        assert_eq!(c["ports"][0]["containerPort"], 9464, "{what}");
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            assert_eq!(text(c, &format!("{probe}/httpGet/path"), what), path);
            assert_eq!(text(c, &format!("{probe}/httpGet/port"), what), port);
        }
        assert_eq!(at(pod, "securityContext/runAsNonRoot", what), true);

        // Config from its ConfigMap, mounted where the arguments look for it.
        let cm_name = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|v| v["configMap"]["name"].as_str())
            .unwrap_or_else(|| panic!("{what}: no ConfigMap volume"));
        let cm = named(&all, "ConfigMap", cm_name)
            .unwrap_or_else(|| panic!("{what}: ConfigMap {cm_name} is not defined"));
        let args: Vec<&str> = at(c, "args", what)
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "config")
            .unwrap();
        assert_eq!(
            Path::new(config_path),
            Path::new(text(mount, "mountPath", what)).join("tandem.toml")
        );
        let cfg: toml::Table = text(cm, "data/tandem.toml", what).parse().unwrap();

        // The grace period covers the sink drain.
        let drain_ms = cfg["delivery"]["drain_deadline_ms"].as_integer().unwrap();
        let grace = at(pod, "terminationGracePeriodSeconds", what)
            .as_i64()
            .unwrap();
        assert!(
            grace * 1000 > drain_ms,
            "{what}: grace {grace} s <= drain {drain_ms} ms"
        );

        // The upstream password: a file of a mounted Secret, where the config reads it
        // (read before every request, so a rotated Secret heals without a restart).
        let password_file = cfg["stream"][0]["auth"]["password_file"].as_str().unwrap();
        let password_file = Path::new(password_file);
        let mount = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| password_file.starts_with(text(m, "mountPath", what)))
            .unwrap_or_else(|| panic!("{what}: nothing mounted at {}", password_file.display()));
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap_or_else(|| panic!("{what}: no volume {}", mount["name"]));
        let secret = text(volume, "secret/secretName", what);
        let defined = named(&all, "Secret", secret)
            .unwrap_or_else(|| panic!("{what}: Secret {secret} is not defined"));
        let file = password_file.file_name().unwrap().to_str().unwrap();
        let key = volume["secret"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["path"] == file)
            .map(|i| text(i, "key", what))
            .unwrap_or_else(|| panic!("{what}: the Secret's items do not hold {file}"));
        assert!(
            defined["stringData"].get(key).is_some(),
            "{what}: Secret {secret} has no {key}"
        );
        assert!(
            c["env"].is_null(),
            "{what}: no credential in the environment"
        );

        // State (ledger, spool) on a claim that exists, where the config writes it.
        let claim = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
            .unwrap_or_else(|| panic!("{what}: no state volume"));
        assert!(named(&all, "PersistentVolumeClaim", claim).is_some());
        let state = c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "state")
            .map(|m| text(m, "mountPath", what))
            .unwrap();
        for dir in [
            cfg["repair"]["ledger_dir"].as_str(),
            cfg["delivery"]["spool_dir"].as_str(),
        ] {
            assert!(
                dir.unwrap().starts_with(state),
                "{what}: {dir:?} not on {state}"
            );
        }

        // A service selects this consumer.
        assert!(
            of_kind(&all, "Service").iter().any(|s| labels_match(
                &s["spec"]["selector"],
                &d["spec"]["template"]["metadata"]["labels"]
            )),
            "{what}: no Service selects it"
        );
    }
    assert_eq!(
        zones.len(),
        2,
        "the two consumers are pinned to different zones"
    );
}

/// Each zone's configuration passes `tandem check`, and the pair splits the upstream's
/// limits: two connections per partition in all, half the connect budget each.
///
/// The NATS token and CA are files of the mounted Secrets: here a planted token and a
/// generated CA at the same file names, which `check` reads and never prints.
#[test]
fn zone_configurations_pass_tandem_check() {
    const PLANTED: &str = "planted-nats-token-5e1c";
    let dir = tempfile::tempdir().unwrap();
    tls_files(dir.path());
    std::fs::write(dir.path().join("token"), format!("{PLANTED}\n")).unwrap();
    std::fs::write(dir.path().join("password"), "planted-upstream-password\n").unwrap();
    let mut connections = 0;
    let mut ids = std::collections::HashSet::new();
    for zone in ["a", "b"] {
        let mut cfg = zone_config(zone);
        let sink = cfg["sinks"]["jetstream"].as_table_mut().unwrap();
        for field in ["token_file", "tls_ca_file"] {
            let name = Path::new(sink[field].as_str().unwrap())
                .file_name()
                .unwrap();
            let local = dir.path().join(name).display().to_string();
            sink.insert(field.to_owned(), local.into());
        }
        let auth = cfg["stream"].as_array_mut().unwrap()[0]["auth"]
            .as_table_mut()
            .unwrap();
        let local = dir.path().join("password").display().to_string();
        auth.insert("password_file".to_owned(), local.into());
        let path = dir.path().join(format!("zone-{zone}.toml"));
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
        let out = succeed(
            Command::new(env!("CARGO_BIN_EXE_tandem"))
                .arg("check")
                .arg("--config")
                .arg(&path)
                .env("GNIP_PASSWORD", "from-the-secret"),
        );
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{printed}");
        assert!(
            !printed.contains(PLANTED) && !printed.contains("planted-upstream-password"),
            "a credential is printed: {printed}"
        );
        assert!(printed.contains("TLS"), "the plan says the sink uses TLS");
        let stream = &cfg["stream"][0];
        connections += stream["paths"].as_array().unwrap().len();
        // The pair shares the upstream's 10 requests and 2 recovery jobs through its
        // bucket, one consumer id per zone.
        assert_eq!(stream["budget"]["requests"].as_integer(), Some(10));
        assert_eq!(cfg["repair"]["max_jobs_per_account"].as_integer(), Some(2));
        let id = cfg["pair"]["consumer_id"]
            .as_str()
            .expect("a [pair] section");
        assert!(ids.insert(id.to_owned()), "zone consumer ids differ: {id}");
    }
    assert_eq!(
        connections, 2,
        "the pair holds two connections per partition"
    );
}

/// Without the Secret's files, `tandem check` names the sink's fields and the paths.
#[test]
fn zone_configuration_without_the_nats_files_fails_check_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zone-a.toml");
    std::fs::write(&path, toml::to_string(&zone_config("a")).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env("GNIP_PASSWORD", "from-the-secret")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{printed}");
    for field in ["sinks.jetstream.token_file", "sinks.jetstream.tls_ca_file"] {
        assert!(printed.contains(field), "{field}: {printed}");
    }
    assert!(printed.contains("/var/run/secrets/nats/"), "{printed}");
}

#[test]
fn systemd_unit_verifies_and_outlasts_the_drain() {
    let unit = std::fs::read_to_string(deploy("systemd/tandem.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("tandem.service");
    std::fs::write(
        &local,
        unit.replace("/usr/local/bin/tandem", env!("CARGO_BIN_EXE_tandem")),
    )
    .unwrap();
    let out = succeed(
        Command::new(tool("systemd-analyze"))
            .arg("verify")
            .arg(&local),
    );
    let complaints = String::from_utf8_lossy(&out.stderr);
    assert!(
        complaints.trim().is_empty(),
        "systemd-analyze: {complaints}"
    );
    let stop_secs: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim_end_matches('s').parse().ok())
        .expect("TimeoutStopSec in seconds");
    let example: toml::Table = std::fs::read_to_string(deploy("tandem.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let drain_ms = example["delivery"]["drain_deadline_ms"]
        .as_integer()
        .unwrap() as u64;
    assert!(stop_secs * 1000 > drain_ms);
    systemd_credentials_are_where_the_example_reads_them(&unit);
    let docker = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    assert!(docker.matches("FROM ").count() >= 2, "multi-stage");
    let user = docker
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the image sets a user");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "non-root"
    );
}

/// The commented-out JetStream sink of deploy/tandem.toml (its `# [sinks.jetstream]` block),
/// without the comment marks.
fn example_jetstream_block() -> String {
    let example = std::fs::read_to_string(deploy("tandem.toml")).unwrap();
    let block: Vec<&str> = example
        .lines()
        .skip_while(|l| *l != "# [sinks.jetstream]")
        .take_while(|l| l.starts_with("# "))
        .map(|l| &l[2..])
        .collect();
    assert!(
        !block.is_empty(),
        "deploy/tandem.toml documents a JetStream sink"
    );
    block.join("\n")
}

/// The unit's `LoadCredential=` files are where the documented JetStream sink reads its
/// token and CA (`/run/credentials/tandem.service/<name>`, as systemd places them; tandem
/// does not expand `$CREDENTIALS_DIRECTORY`), and that sink passes `tandem check` when
/// those files exist (the credentials directory replaced by one with generated files).
fn systemd_credentials_are_where_the_example_reads_them(unit: &str) {
    let credentials_dir = "/run/credentials/tandem.service";
    let loaded: BTreeSet<String> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("LoadCredential="))
        .map(|c| c.split(':').next().unwrap().to_owned())
        .collect();
    let block = example_jetstream_block();
    let sink: toml::Table = block.parse().expect("the documented sink is TOML");
    let sink = &sink["sinks"]["jetstream"];
    for field in ["token_file", "tls_ca_file"] {
        let path = sink[field].as_str().unwrap();
        let name = path
            .strip_prefix(&format!("{credentials_dir}/"))
            .unwrap_or_else(|| panic!("{field} {path} is not a credential of tandem.service"));
        assert!(
            loaded.contains(name),
            "no LoadCredential={name}: {loaded:?}"
        );
    }
    assert!(
        sink["url"]
            .as_str()
            .unwrap()
            .split(',')
            .all(|u| u.starts_with("tls://")),
        "the documented sink requires TLS"
    );

    let dir = tempfile::tempdir().unwrap();
    tls_files(dir.path());
    std::fs::write(
        dir.path().join("nats-ca.crt"),
        std::fs::read(dir.path().join("ca.crt")).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.path().join("nats-token"), "planted-credential-token\n").unwrap();
    let example = std::fs::read_to_string(deploy("tandem.toml")).unwrap();
    let enabled = example
        .replace("sink = \"files\"", "sink = \"jetstream\"")
        .replace(
            &example_jetstream_block()
                .lines()
                .map(|l| format!("# {l}"))
                .collect::<Vec<_>>()
                .join("\n"),
            &block,
        )
        .replace(credentials_dir, &dir.path().display().to_string());
    assert!(
        enabled.contains("\n[sinks.jetstream]"),
        "the block is enabled"
    );
    let path = dir.path().join("tandem.toml");
    std::fs::write(&path, enabled).unwrap();
    let out = succeed(
        Command::new(env!("CARGO_BIN_EXE_tandem"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .env("GNIP_PASSWORD", "from-the-environment-file"),
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(!printed.contains("planted-credential-token"), "{printed}");
}

// ---------------------------------------------------------------------------- Kafka

/// Where the consumers mount the Secret `tandem-kafka` (deploy/README.md).
const KAFKA_SECRET_MOUNT: &str = "/var/run/secrets/kafka";

/// Every example configuration under deploy/kafka, with its file name.
fn kafka_examples() -> Vec<(String, toml::Table)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kafka"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "the OCI, Apache Kafka and pair examples");
    files
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(p).unwrap();
            let cfg = text
                .parse()
                .unwrap_or_else(|e| panic!("{name} is not TOML: {e}"));
            (name, cfg)
        })
        .collect()
}

/// The sinks of `cfg` of one kind, by name.
fn sinks_of_kind<'a>(cfg: &'a toml::Table, kind: &str) -> Vec<(&'a String, &'a toml::Table)> {
    cfg["sinks"]
        .as_table()
        .unwrap()
        .iter()
        .map(|(name, s)| (name, s.as_table().unwrap()))
        .filter(|(_, s)| s["kind"].as_str() == Some(kind))
        .collect()
}

/// The sinks the streams of `cfg` route to.
fn routed_sinks(cfg: &toml::Table) -> BTreeSet<String> {
    cfg["stream"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sink"].as_str().unwrap().to_owned())
        .collect()
}

/// Replaces every file `cfg` reads a credential or a CA from by one in `dir`: the CA by
/// the generated `ca.crt` (a PEM certificate, which the NATS sink requires), each secret by
/// a planted value of its own. Returns the planted values.
fn plant_secret_files(cfg: &mut toml::Table, dir: &Path, file: &str) -> Vec<String> {
    let mut planted = Vec::new();
    let mut plant = |table: &mut toml::Table, field: &str, what: &str| {
        if !table.contains_key(field) {
            return;
        }
        let local = if field.ends_with("ca_file") {
            dir.join("ca.crt")
        } else {
            let value = format!("planted-{what}-{}-{field}-3f9b", planted.len());
            let path = dir.join(format!("{file}-{what}-{field}"));
            std::fs::write(&path, format!("{value}\n")).unwrap();
            planted.push(value);
            path
        };
        table.insert(field.to_owned(), local.display().to_string().into());
    };
    for stream in cfg["stream"].as_array_mut().unwrap() {
        let auth = stream["auth"].as_table_mut().unwrap();
        plant(auth, "password_file", "upstream");
    }
    for (name, sink) in cfg["sinks"].as_table_mut().unwrap() {
        let sink = sink.as_table_mut().unwrap();
        for field in ["password_file", "token_file", "tls_ca_file"] {
            plant(sink, field, name);
        }
    }
    planted
}

/// Each Kafka example passes `tandem check` with the Secrets' files planted where it reads
/// them, and prints neither a planted password nor the SASL user. Their settings hang
/// together with the Secret `tandem-kafka` and with what the services take: OCI Streaming's
/// 1 MiB limit, SASL PLAIN, no idempotent producer, streams made outside tandem; a pair
/// coordinates through a NATS sink that stores nothing, with a delivery timeout inside the
/// writer lease.
#[test]
fn kafka_examples_pass_tandem_check() {
    let all = manifests();
    let secret_keys = secret_keys(&all, "tandem-kafka");
    let dir = tempfile::tempdir().unwrap();
    tls_files(dir.path());
    let mut pairs = 0;
    for (file, original) in kafka_examples() {
        let kafka = sinks_of_kind(&original, "kafka");
        assert_eq!(kafka.len(), 1, "{file}: one Kafka sink");
        let (name, sink) = kafka[0];
        assert_eq!(
            routed_sinks(&original),
            BTreeSet::from([name.clone()]),
            "{file}: every stream stores into the Kafka sink"
        );
        // The credentials are files of the Secret tandem-kafka, mounted where the sink reads
        // them.
        for field in ["password_file", "tls_ca_file"] {
            let Some(path) = sink.get(field).and_then(|v| v.as_str()) else {
                continue;
            };
            let key = Path::new(path)
                .strip_prefix(KAFKA_SECRET_MOUNT)
                .unwrap_or_else(|_| panic!("{file}: {field} {path} not under {KAFKA_SECRET_MOUNT}"))
                .to_str()
                .unwrap();
            assert!(
                secret_keys.contains(key),
                "{file}: {field}: the Secret tandem-kafka has no key {key}"
            );
        }
        assert!(
            sink.contains_key("password_file") && !sink.contains_key("password_env"),
            "{file}: the SASL password is a mounted file"
        );
        let servers = sink["bootstrap_servers"].as_str().unwrap();
        if servers.contains(".oci.oraclecloud.com") {
            let what = format!("{file} (OCI Streaming)");
            assert_eq!(
                sink["security_protocol"].as_str(),
                Some("sasl_ssl"),
                "{what}"
            );
            assert_eq!(sink["sasl_mechanism"].as_str(), Some("plain"), "{what}");
            assert_eq!(sink["idempotence"].as_bool(), Some(false), "{what}");
            assert_eq!(sink["create_topic"].as_bool(), Some(false), "{what}");
            let max = sink["max_message_bytes"].as_integer().unwrap();
            assert!(max <= 1_048_576, "{what}: at most 1 MiB per message");
            let batch = sink["batch_bytes"].as_integer().unwrap();
            assert!(batch < 1_048_576, "{what}: a request under 1 MiB");
            assert!(
                sink["sasl_username"].as_str().unwrap().split('/').count() == 3,
                "{what}: <tenancy>/<user>/<stream pool OCID>"
            );
        }
        if let Some(pair) = original.get("pair") {
            pairs += 1;
            // Coordination through a NATS sink that no stream routes to.
            let nats = sinks_of_kind(&original, "nats");
            let coordination = pair["sink"].as_str().expect("[pair] names its NATS sink");
            assert!(
                nats.iter().any(|(n, _)| *n == coordination),
                "{file}: pair.sink {coordination} is a NATS sink"
            );
            assert!(
                !routed_sinks(&original).contains(coordination),
                "{file}: the coordination sink stores nothing"
            );
            // The delivery timeout written is the one that applies: within the lease's
            // fence, a third of lease_ttl_ms less 200 ms.
            let ttl = pair["lease_ttl_ms"].as_integer().unwrap();
            let timeout = sink["delivery_timeout_ms"].as_integer().unwrap();
            assert!(
                timeout <= ttl / 3 - 200,
                "{file}: delivery_timeout_ms {timeout} over the writer lease's fence"
            );
        }

        let mut cfg = original.clone();
        let stem = file.trim_end_matches(".toml");
        let planted = plant_secret_files(&mut cfg, dir.path(), stem);
        assert!(!planted.is_empty(), "{file}: credentials planted");
        let path = dir.path().join(&file);
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
        let out = succeed(
            Command::new(env!("CARGO_BIN_EXE_tandem"))
                .arg("check")
                .arg("--config")
                .arg(&path),
        );
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{file}:\n{printed}");
        for secret in &planted {
            assert!(
                !printed.contains(secret),
                "{file}: a credential is printed: {printed}"
            );
        }
        // OCI's user names the tenancy and the stream pool: the plan leaves it out (a plain
        // user name like "tandem" would be found in the plan's paths and names anyway).
        let user = sink["sasl_username"].as_str().unwrap();
        assert!(
            !user.contains('/') || !printed.contains(user),
            "{file}: the SASL user is printed"
        );
        assert!(
            printed.contains(&format!(
                "sink {name}: kafka, topic {}",
                sink["topic"].as_str().unwrap()
            )),
            "{file}: the plan names the topic: {printed}"
        );
    }
    assert!(pairs >= 1, "an example of a pair storing into Kafka");

    // The image builds librdkafka's TLS against OpenSSL's headers and carries the library
    // the binary links.
    let docker = std::fs::read_to_string(deploy("Dockerfile")).unwrap();
    let stages: Vec<&str> = docker.split("\nFROM ").skip(1).collect();
    let (build, run) = (stages[0], stages[stages.len() - 1]);
    assert!(
        build.contains("libssl-dev"),
        "the build stage installs libssl-dev"
    );
    assert!(
        run.contains("libssl3"),
        "the runtime stage installs libssl3"
    );
}

/// Without the Secrets' files, `tandem check` fails naming each Kafka sink's credential and
/// CA by its sink and the mounted path it reads.
#[test]
fn kafka_examples_without_the_secret_files_fail_check_by_field() {
    for (file, cfg) in kafka_examples() {
        let (name, sink) = sinks_of_kind(&cfg, "kafka")[0];
        let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .arg("check")
            .arg("--config")
            .arg(deploy(&format!("kafka/{file}")))
            .output()
            .unwrap();
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{file}: {printed}");
        // The password's problem is reported under the sink (as `token_file`, the name its
        // source has for every sink kind).
        let password = sink["password_file"].as_str().unwrap();
        let line = printed
            .lines()
            .find(|l| l.contains(password))
            .unwrap_or_else(|| panic!("{file}: nothing about {password}: {printed}"));
        assert!(line.contains(&format!("sinks.{name}.")), "{file}: {line}");
        if let Some(ca) = sink.get("tls_ca_file").and_then(|v| v.as_str()) {
            let field = format!("sinks.{name}.tls_ca_file");
            assert!(
                printed
                    .lines()
                    .any(|l| l.contains(&field) && l.contains(ca)),
                "{file}: {field}: {printed}"
            );
        }
        assert!(
            printed.contains("stream[0].auth.password_file"),
            "{file}: {printed}"
        );
    }
}

// ---------------------------------------------------------------------------- dashboards

/// A dashboard query: where it is, and its PromQL with Grafana's variables.
#[derive(Debug, Clone)]
struct Query {
    origin: String,
    expr: String,
}

fn dashboards() -> Vec<(String, Value)> {
    let mut files: Vec<_> = std::fs::read_dir(repo().join("dashboards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "overview and connection boards");
    files
        .iter()
        .map(|p| {
            let d = serde_json::from_slice(&std::fs::read(p).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), d)
        })
        .collect()
}

/// Every panel query and every variable's selector (from `label_values(selector, label)`).
fn dashboard_queries() -> Vec<Query> {
    let mut out = Vec::new();
    for (file, d) in dashboards() {
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push(Query {
                    origin: format!("{file}: {} {}", p["title"], t["refId"]),
                    expr: t["expr"].as_str().unwrap().to_owned(),
                });
            }
        }
        for v in d["templating"]["list"].as_array().unwrap() {
            if v["type"] == "query" {
                let q = v["definition"].as_str().unwrap();
                let inner = q
                    .strip_prefix("label_values(")
                    .and_then(|q| q.rsplit_once(','))
                    .map(|(selector, _)| selector.to_owned())
                    .unwrap_or_else(|| panic!("{file}: variable query {q}"));
                out.push(Query {
                    origin: format!("{file}: variable {}", v["name"]),
                    expr: inner,
                });
            }
        }
    }
    out
}

/// The query as Grafana would send it with every variable on "All".
fn substitute(expr: &str) -> String {
    expr.replace("$__rate_interval", "20s")
        .replace("$__range", "10m")
        .replace("$stream", ".*")
        .replace("$partition", ".*")
        .replace("$path", ".*")
        .replace("$instance", ".*")
}

#[test]
fn dashboards_are_importable_and_every_query_parses() {
    for (file, d) in dashboards() {
        assert!(d["uid"].is_string() && d["title"].is_string(), "{file}");
        let vars = d["templating"]["list"].as_array().unwrap();
        assert!(
            vars.iter()
                .any(|v| v["type"] == "datasource" && v["name"] == "datasource"),
            "{file}: the datasource is a variable"
        );
        let mut ids = BTreeSet::new();
        for p in d["panels"].as_array().unwrap() {
            assert!(
                ids.insert(p["id"].as_u64().unwrap()),
                "{file}: duplicate panel id"
            );
            if p["type"] != "row" {
                assert_eq!(
                    p["datasource"]["uid"], "${datasource}",
                    "{file}: {}",
                    p["title"]
                );
                assert!(p["targets"].as_array().is_some_and(|t| !t.is_empty()));
            }
        }
    }
    // promtool parses every query as the expression of a recording rule.
    let queries = dashboard_queries();
    let mut rules = String::from("groups:\n  - name: dashboard-queries\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&substitute(&q.expr)).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, rules).unwrap();
    succeed(
        Command::new(tool("promtool"))
            .args(["check", "rules"])
            .arg(&file),
    );
    println!("{} dashboard queries parse", queries.len());
}

// ---------------------------------------------------------------------------- live

/// A child process killed when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn get(url: &str) -> Result<String, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--fail", url])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The series a Prometheus instant query returns.
fn instant(prom: u16, expr: &str) -> Result<Vec<Value>, String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--get"])
        .arg(format!("http://127.0.0.1:{prom}/api/v1/query"))
        .arg("--data-urlencode")
        .arg(format!("query={expr}"))
        .output()
        .map_err(|e| e.to_string())?;
    let body: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))?;
    if body["status"] != "success" {
        return Err(body.to_string());
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Metric series names of an exposition, each with the label names it carries.
fn exported(metrics_text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in metrics_text.lines().filter(|l| !l.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..name_end].to_owned()).or_default();
        if let Some(rest) = line[name_end..].strip_prefix('{') {
            let body = &rest[..rest.rfind('}').unwrap_or(rest.len())];
            for pair in body.split("\",") {
                if let Some((k, _)) = pair.split_once('=') {
                    labels.insert(k.trim().to_owned());
                }
            }
        }
    }
    out
}

/// `tandem_*` series names an expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("tandem_") {
        let start = i + pos;
        let boundary = start == 0
            || !(bytes[start - 1].is_ascii_alphanumeric()
                || bytes[start - 1] == b'_'
                || bytes[start - 1] == b':');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .map_or(expr.len(), |e| start + e);
        if boundary && !expr[start..end].contains(':') {
            out.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    out
}

/// Label names an expression uses: in matchers and in `by`/`without`/`on`/`ignoring`.
fn label_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for keyword in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        let mut rest = expr;
        while let Some(pos) = rest.find(keyword) {
            let before_ok = pos == 0
                || !rest.as_bytes()[pos - 1].is_ascii_alphanumeric()
                    && rest.as_bytes()[pos - 1] != b'_';
            let after = rest[pos + keyword.len()..].trim_start();
            if before_ok && after.starts_with('(') {
                let list = &after[1..after.find(')').unwrap()];
                out.extend(
                    list.split(',')
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_owned),
                );
            }
            rest = &rest[pos + keyword.len()..];
        }
    }
    let mut rest = expr;
    while let Some(open) = rest.find('{') {
        let close = open + rest[open..].find('}').unwrap();
        for matcher in rest[open + 1..close].split(',') {
            if let Some(end) = matcher.find(['=', '!']) {
                let name = matcher[..end].trim();
                if !name.is_empty() {
                    out.insert(name.to_owned());
                }
            }
        }
        rest = &rest[close + 1..];
    }
    out
}

/// Labels Prometheus adds to every scraped series (or the histogram bucket label).
const TARGET_LABELS: [&str; 3] = ["job", "instance", "zone"];

/// Problems with an expression's metrics: missing from the exposition, or lacking a label
/// the expression uses.
fn contract_problems(
    origin: &str,
    expr: &str,
    exported: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let metrics = metric_names(expr);
    for metric in &metrics {
        let Some(has) = exported.get(metric) else {
            problems.push(format!("{origin}: {metric} is not exported"));
            continue;
        };
        for label in label_names(expr) {
            if TARGET_LABELS.contains(&label.as_str()) || has.contains(&label) {
                continue;
            }
            problems.push(format!(
                "{origin}: {metric} has no label {label:?} (has {has:?})"
            ));
        }
    }
    problems
}

/// The whole chain for real: `tandem demo` (the binary) serves metrics, a real Prometheus on
/// an ephemeral loopback port scrapes it every second and evaluates the pair's rules, and
/// every dashboard query returns data while the demo's faults play out. The same scrape
/// proves that every metric the rules and dashboards read is exported with the labels they
/// use.
#[test]
fn dashboard_queries_return_data_from_prometheus_scraping_a_running_demo() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = tandem_scenario::free_port().expect("an ephemeral port");
    let demo_secs = 60;
    let demo_log = std::fs::File::create(dir.path().join("demo.out")).unwrap();
    let _demo = Running(
        Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["--log", "warn", "demo", "--duration"])
            .arg(format!("{demo_secs}s"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .stdout(Stdio::from(demo_log.try_clone().unwrap()))
            .stderr(Stdio::from(demo_log))
            .spawn()
            .expect("tandem demo starts"),
    );
    let started = Instant::now();

    let prom_port = tandem_scenario::free_port().expect("an ephemeral port");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: tandem\n    static_configs:\n      \
             - targets: ['127.0.0.1:{metrics_port}']\n        labels:\n          zone: a\n",
            rules = deploy("prometheus/rules.yml").display()
        ),
    )
    .unwrap();
    let prom_log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = Running(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(prom_log))
            .spawn()
            .expect("prometheus starts"),
    );
    let ready = |url: &str, within: Duration| {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if get(url).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    };
    assert!(
        ready(
            &format!("http://127.0.0.1:{prom_port}/-/ready"),
            Duration::from_secs(30)
        ),
        "prometheus is ready: {}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
    assert!(
        ready(
            &format!("http://127.0.0.1:{metrics_port}/metrics"),
            Duration::from_secs(30)
        ),
        "the demo serves metrics: {}",
        std::fs::read_to_string(dir.path().join("demo.out")).unwrap_or_default()
    );

    // The demo drops a path at 20 %, stalls one at 40 % and takes a partition down at 60 %
    // of its run; by 75 % every kind of series the boards show exists.
    let wait_until = Duration::from_secs(demo_secs * 3 / 4);
    std::thread::sleep(wait_until.saturating_sub(started.elapsed()));
    let queries = dashboard_queries();
    let deadline = started + Duration::from_secs(demo_secs - 3);
    let mut empty: Vec<String>;
    loop {
        empty = queries
            .iter()
            .filter_map(|q| match instant(prom_port, &substitute(&q.expr)) {
                Ok(series) if !series.is_empty() => None,
                Ok(_) => Some(format!("{}: no data for {}", q.origin, q.expr)),
                Err(e) => Some(format!("{}: {e}", q.origin)),
            })
            .collect();
        if empty.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without data:\n{}",
        empty.join("\n")
    );
    println!("{} dashboard queries return data", queries.len());

    // The rules evaluate on real series: the pair's recording rule has the partitions.
    let live = instant(prom_port, "tandem:partition_live_connections:sum").unwrap();
    assert_eq!(live.len(), 2, "both partitions: {live:?}");

    // Every metric used by a rule or a dashboard is exported, with the labels used.
    let scrape = get(&format!("http://127.0.0.1:{metrics_port}/metrics")).unwrap();
    let exported = exported(&scrape);
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (name, expr) in rule_exprs() {
        used.extend(metric_names(&expr));
        problems.extend(contract_problems(
            &format!("rules.yml {name}"),
            &expr,
            &exported,
        ));
    }
    for q in &queries {
        used.extend(metric_names(&q.expr));
        problems.extend(contract_problems(&q.origin, &q.expr, &exported));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    println!(
        "{} metrics used by rules and dashboards, all exported",
        used.len()
    );
}

#[test]
fn the_contract_check_catches_a_missing_metric_and_a_missing_label() {
    let exported = exported(
        "# TYPE tandem_live_connections gauge\n\
         tandem_live_connections{stream=\"decahose\",partition=\"1\"} 2\n\
         tandem_path_lag_seconds_bucket{stream=\"d\",partition=\"1\",path=\"a\",le=\"0.1\"} 3\n",
    );
    let ok = "sum by (stream, partition) (tandem_live_connections{job=\"tandem\"})";
    assert!(contract_problems("ok", ok, &exported).is_empty());
    let bucket =
        "histogram_quantile(0.9, sum by (le, path) (rate(tandem_path_lag_seconds_bucket[1m])))";
    assert!(contract_problems("bucket", bucket, &exported).is_empty());
    let missing = "sum(rate(tandem_nonexistent_total[1m]))";
    assert_eq!(contract_problems("m", missing, &exported).len(), 1);
    let bad_label = "sum by (path) (tandem_live_connections)";
    assert_eq!(contract_problems("l", bad_label, &exported).len(), 1);
    assert_eq!(
        metric_names("tandem:partition_live_connections:sum > tandem_live_connections"),
        BTreeSet::from(["tandem_live_connections".to_owned()])
    );
}

/// The NetworkPolicy selects every consumer pod, admits scrapes on the port the containers
/// serve metrics on, and lets the consumers reach NATS and the upstream (HTTPS) and DNS.
#[test]
fn network_policy_covers_the_consumers_and_their_peers() {
    let all = manifests();
    let policy = named(&all, "NetworkPolicy", "tandem").expect("a NetworkPolicy named tandem");
    let what = "k8s/networkpolicy.yaml";
    let selector = at(policy, "spec/podSelector/matchLabels", what);
    let deployments = of_kind(&all, "Deployment");
    assert!(!deployments.is_empty());
    for d in deployments {
        let pod_labels = at(d, "spec/template/metadata/labels", what);
        assert!(
            labels_match(selector, pod_labels),
            "{what}: selects every consumer pod"
        );
        let ports = at(d, "spec/template/spec/containers", what)[0]["ports"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let metrics = ports
            .iter()
            .find(|p| p["name"] == "metrics")
            .and_then(|p| p["containerPort"].as_u64())
            .expect("a metrics port");
        let ingress = at(policy, "spec/ingress", what).as_array().unwrap();
        assert!(
            ingress.iter().any(|r| r["ports"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| p["port"].as_u64() == Some(metrics)))),
            "{what}: scrapes reach port {metrics}"
        );
    }
    let egress_ports: Vec<u64> = at(policy, "spec/egress", what)
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["ports"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["port"].as_u64())
        .collect();
    for port in [53, 4222, 443] {
        assert!(
            egress_ports.contains(&port),
            "{what}: egress to port {port}"
        );
    }
}
