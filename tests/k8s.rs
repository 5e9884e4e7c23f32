//! The Kubernetes manifests in `k8s/`: valid against the Kubernetes API schemas
//! (kubernetes-validate, offline, strict), and consistent with Weir itself: the
//! ConfigMap's weir.toml and the example Secret's apps.toml load as Weir loads them,
//! and the pod's grace period outlasts the drain it configures.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv_bin(name: &str) -> PathBuf {
    let p = root().join("target/k8s-venv/bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-deps.sh test",
        p.display()
    );
    p
}

fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

/// Every document of a YAML file, as JSON (PyYAML from the same virtualenv).
fn documents(file: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(venv_bin("python"))
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
        ])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn find<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn the_manifests_are_valid_kubernetes_resources() {
    let files = manifests();
    assert!(files.len() >= 5, "{files:?}");
    let out = Command::new(venv_bin("kubernetes-validate"))
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for kind in [
        "daemonset/weir",
        "service/weir-http",
        "service/weir-rtmp",
        "service/weir-metrics",
        "ingress/weir",
        "poddisruptionbudget/weir",
        "configmap/weir-config",
        "secret/weir-secrets",
        "statefulset/redis",
        "service/redis",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind} ")),
            "{kind} was not validated: {text}"
        );
    }
    // The one custom resource (Prometheus Operator) has no schema here: it is the
    // only thing allowed to be skipped.
    for line in text.lines().filter(|l| l.contains("Couldn't find schema")) {
        assert!(line.contains("kind ServiceMonitor"), "{line}");
    }
    let monitor = documents(&root().join("k8s/servicemonitor.yaml"));
    let m = find(&monitor, "ServiceMonitor");
    assert_eq!(m["spec"]["endpoints"][0]["port"], "metrics");
    assert_eq!(
        m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
        "metrics"
    );
}

#[test]
fn the_manifests_agree_with_weir() {
    let k8s = root().join("k8s");
    let config_map = documents(&k8s.join("config.yaml"));
    let toml_text = find(&config_map, "ConfigMap")["data"]["weir.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret = documents(&k8s.join("secret.example.yaml"));
    let secret = find(&secret, "Secret");
    let apps = secret["stringData"]["apps.toml"].as_str().unwrap();
    // Load it as the pod does: the Secret's apps.toml where app_files says.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("apps.toml"), apps).unwrap();
    let toml_text = toml_text.replace("/etc/weir-secrets/apps.toml", "apps.toml");
    std::fs::write(dir.path().join("weir.toml"), &toml_text).unwrap();
    let mut config = weir::config::Config::load(&dir.path().join("weir.toml")).unwrap();
    assert_eq!(config.apps.len(), 1);
    // The pod's environment, as the DaemonSet sets it.
    let weir = documents(&k8s.join("weir.yaml"));
    let ds = find(&weir, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .map(|(k, v)| {
            let v = v
                .replace("$(NODE_NAME)", "node-1")
                .replace("$(HOST_IP)", "10.1.2.3");
            (k, v)
        })
        .collect();
    config.apply_env(env).unwrap();
    assert_eq!(config.cluster.node_id, "node-1");
    assert_eq!(config.cluster.advertise_http, "http://10.1.2.3:8080");
    assert_eq!(config.server.announce_ips, vec!["10.1.2.3".to_string()]);
    let names: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"WEIR_CLUSTER_REDIS_URL"));
    // The example key is empty: Weir refuses to start with it...
    weir::auth::Keyring::from_configs(&config.apps).unwrap_err();
    // ...that is the only thing an operator must replace: with a real key it loads.
    let mut real = config.apps.clone();
    real[0] = weir::auth::AppKeys::generate_config(real[0].sdk_app_id);
    weir::auth::Keyring::from_configs(&real).unwrap();
    // Drain fits in the grace period; probes are Weir's health endpoints on its port.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > config.cluster.drain_s + config.server.shutdown_grace_s * 3);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let port = |addr: &str| addr.rsplit(':').next().unwrap().parse::<u64>().unwrap();
    let ports: Vec<(u64, String)> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["containerPort"].as_u64().unwrap(),
                p["protocol"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (addr, proto) in [
        (&config.server.http_addr, "TCP"),
        (&config.server.udp_addr, "UDP"),
        (&config.server.tcp_addr, "TCP"),
        (&config.server.rtmp_addr, "TCP"),
        (&config.server.metrics_addr, "TCP"),
    ] {
        assert!(
            ports.contains(&(port(addr), proto.to_owned())),
            "{addr} {proto} is not a container port: {ports:?}"
        );
    }
    assert_eq!(
        container["livenessProbe"]["httpGet"]["port"].as_u64(),
        Some(port(&config.server.http_addr))
    );
}
