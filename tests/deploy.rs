//! Checks on the deployment files under `deploy/`: the Kubernetes manifests, the Prometheus rules
//! and the Grafana dashboard parse, agree with each other and with the code (the config loads,
//! every metric and label they query is one pcgate exports).
//!
//! Not covered here: `deploy/Dockerfile` (needs Docker), `deploy/systemd/pcgate.service`
//! (`systemd-analyze verify`), the alerts' behaviour (`promtool test rules
//! deploy/prometheus/alerts.test.yml`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use pcgate::config::Config;
use pcgate::layer::cache::CacheStatus;
use pcgate::metrics::{status_class, CredentialLabel, Metrics, RouteLabel, TokenLabels};
use serde::Deserialize;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every YAML document in `path`, as JSON values.
fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not valid YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let dir = root().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml")))
        .collect();
    files.sort();
    files
}

/// The one document of `kind` in deploy/kubernetes.
fn k8s(kind: &str) -> Value {
    let mut found: Vec<Value> = yaml_files("deploy/kubernetes")
        .iter()
        .flat_map(|p| yaml_docs(p))
        .filter(|doc| doc["kind"] == kind)
        .collect();
    assert_eq!(found.len(), 1, "expected one {kind} in deploy/kubernetes");
    found.remove(0)
}

fn str_of<'a>(value: &'a Value, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {value}"))
}

fn array<'a>(value: &'a Value, what: &str) -> &'a Vec<Value> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {value}"))
}

fn named<'a>(list: &'a Value, name: &str, what: &str) -> &'a Value {
    array(list, what)
        .iter()
        .find(|item| item["name"] == name)
        .unwrap_or_else(|| panic!("{what}: no entry named `{name}`"))
}

/// The pcgate.toml held by the ConfigMap, loaded and validated as pcgate would.
fn pod_config() -> Config {
    let configmap = k8s("ConfigMap");
    let text = str_of(
        &configmap["data"]["pcgate.toml"],
        "ConfigMap data pcgate.toml",
    );
    Config::from_toml(text).unwrap_or_else(|e| panic!("the ConfigMap's pcgate.toml: {e}"))
}

/// A path as a container sees it, by components: `/var/run` is `/run` (a symlink to it in the
/// images pcgate ships on and in most others), `.` parts dropped.
fn container_path(path: &str) -> PathBuf {
    let path = Path::new(path);
    let path = match path.strip_prefix("/var/run") {
        Ok(rest) => Path::new("/run").join(rest),
        Err(_) => path.to_owned(),
    };
    path.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

/// Whether `path` is `dir` or lies under it, compared by path components (so `/etc/pcgate.toml`
/// is not under `/etc/pc`, and `/var/run/secrets/x` is under `/run/secrets`).
fn is_within(path: &str, dir: &str) -> bool {
    container_path(path).starts_with(container_path(dir))
}

#[test]
fn paths_are_compared_by_component_with_var_run_as_run() {
    assert!(is_within("/etc/pcgate/pcgate.toml", "/etc/pcgate"));
    assert!(is_within("/etc/pcgate/pcgate.toml", "/etc/pcgate/"));
    assert!(is_within("/etc/pcgate", "/etc/pcgate"));
    assert!(!is_within("/etc/pcgate.toml", "/etc/pc"));
    assert!(!is_within("/etc/pcgate/pcgate.toml", "/etc/pc"));
    assert!(is_within(
        "/var/run/secrets/azure/tokens/azure-identity-token",
        "/run/secrets/azure"
    ));
    assert!(is_within(
        "/run/secrets/pcgate/client-secret",
        "/var/run/secrets"
    ));
    assert!(!is_within(
        "/var/run/secrets/azure/tokens/azure-identity-token",
        "/var/run/secrets/az"
    ));
}

/// A Kubernetes memory quantity (`64Mi`, `1Gi`, `512M`) in bytes.
fn quantity_bytes(quantity: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return n.parse::<u64>().expect("a whole number") * factor;
        }
    }
    quantity.parse().expect("a memory quantity")
}

#[test]
fn every_deploy_yaml_file_parses() {
    let mut count = 0;
    for dir in ["deploy/kubernetes", "deploy/prometheus"] {
        for path in yaml_files(dir) {
            let docs = yaml_docs(&path);
            assert!(!docs.is_empty(), "{}: no YAML document", path.display());
            count += 1;
            if dir == "deploy/kubernetes" {
                for doc in &docs {
                    assert!(
                        doc["apiVersion"].is_string(),
                        "{}: no apiVersion",
                        path.display()
                    );
                    assert!(doc["kind"].is_string(), "{}: no kind", path.display());
                }
            }
        }
    }
    // configmap, deployment, kustomization, secret, serviceaccount; alerts, alerts.test
    assert!(count >= 7, "only {count} YAML files under deploy/");
}

#[test]
fn the_deployment_runs_pcgate_as_a_native_sidecar() {
    let deployment = k8s("Deployment");
    let config = pod_config();
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    let inits = array(&spec["initContainers"], "initContainers");
    let position = |name: &str| inits.iter().position(|c| c["name"] == name);
    let pcgate = named(&spec["initContainers"], "pcgate", "initContainers");

    // A native sidecar: an init container that keeps running.
    assert_eq!(
        pcgate["restartPolicy"], "Always",
        "pcgate must be a native sidecar"
    );
    assert!(
        position("seed-refresh-token") < position("pcgate"),
        "the refresh token must be seeded before pcgate starts"
    );

    let args: Vec<&str> = array(&pcgate["args"], "pcgate args")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--log-format", "json"]),
        "{args:?}"
    );
    assert!(args.contains(&"run"), "{args:?}");
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1])
        .expect("--config FILE");

    // The config file comes from the ConfigMap.
    let mount = array(&pcgate["volumeMounts"], "pcgate volumeMounts")
        .iter()
        .find(|m| is_within(config_path, str_of(&m["mountPath"], "mountPath")))
        .expect("a volume mounted over the config path");
    let volume = named(
        &spec["volumes"],
        str_of(&mount["name"], "mount name"),
        "volumes",
    );
    assert_eq!(
        volume["configMap"]["name"],
        k8s("ConfigMap")["metadata"]["name"]
    );

    // Probes: /healthz for liveness, /readyz for readiness, on the admin port.
    let admin_port = config.server.admin_listen.port();
    assert!(
        config.server.admin_listen.ip().is_unspecified(),
        "kubelet must reach admin_listen"
    );
    let port_of = |probe: &Value| -> u16 {
        match &probe["httpGet"]["port"] {
            Value::Number(n) => n.as_u64().expect("a port") as u16,
            Value::String(name) => named(&pcgate["ports"], name, "ports")["containerPort"]
                .as_u64()
                .expect("containerPort") as u16,
            other => panic!("probe port {other}"),
        }
    };
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(pcgate[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(port_of(&pcgate[probe]), admin_port, "{probe} port");
    }
    if !pcgate["startupProbe"].is_null() {
        assert_eq!(
            port_of(&pcgate["startupProbe"]),
            admin_port,
            "startupProbe port"
        );
    }

    // Prometheus scrapes the admin port.
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // The billing app calls pcgate on loopback.
    assert!(
        config.server.listen.ip().is_loopback(),
        "the gateway must stay pod-local"
    );
    let app = &array(&spec["containers"], "containers")[0];
    let base_url = named(&app["env"], "PARTNER_CENTER_BASE_URL", "app env");
    assert_eq!(
        base_url["value"],
        format!("http://{}", config.server.listen),
        "the app must call pcgate's listen address"
    );

    // Every container is locked down.
    let all = inits.iter().chain(array(&spec["containers"], "containers"));
    for container in all {
        let name = &container["name"];
        let sc = &container["securityContext"];
        let non_root =
            sc["runAsNonRoot"] == true || spec["securityContext"]["runAsNonRoot"] == true;
        assert!(non_root, "{name}: runAsNonRoot");
        assert_eq!(
            sc["readOnlyRootFilesystem"], true,
            "{name}: readOnlyRootFilesystem"
        );
        assert_eq!(
            sc["allowPrivilegeEscalation"], false,
            "{name}: allowPrivilegeEscalation"
        );
        assert_eq!(
            sc["capabilities"]["drop"],
            serde_json::json!(["ALL"]),
            "{name}: drop ALL"
        );
        assert!(
            container["resources"]["requests"]["memory"].is_string(),
            "{name}: requests"
        );
        assert!(
            container["resources"]["limits"]["memory"].is_string(),
            "{name}: memory limit"
        );
    }

    // The cache fits the memory limit with room for the process and in-flight bodies.
    let limit = quantity_bytes(str_of(
        &pcgate["resources"]["limits"]["memory"],
        "memory limit",
    ));
    assert!(
        config.cache.max_bytes.as_u64() * 2 <= limit,
        "cache.max_bytes {} leaves too little of the {limit}-byte memory limit",
        config.cache.max_bytes
    );
    assert!(
        pcgate["resources"]["requests"]["cpu"].is_string(),
        "pcgate: cpu request"
    );

    // Kubernetes waits long enough for pcgate's drain.
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > config.server.shutdown_grace.as_secs(),
        "grace {grace}s"
    );
}

#[test]
fn the_configmap_config_loads_with_the_shipped_route_table_and_mounted_files() {
    let config = pod_config();
    let shipped =
        Config::from_toml(&read(&root().join("config/pcgate.toml"))).expect("config/pcgate.toml");
    assert_eq!(
        serde_json::to_value(&config.routes).unwrap(),
        serde_json::to_value(&shipped.routes).unwrap(),
        "the ConfigMap's route table differs from config/pcgate.toml"
    );
    assert_eq!(
        serde_json::to_value(&config.retry).unwrap(),
        serde_json::to_value(&shipped.retry).unwrap(),
        "the ConfigMap's retry policy differs from config/pcgate.toml"
    );

    let deployment = k8s("Deployment");
    let spec = &deployment["spec"]["template"]["spec"];
    let secret = k8s("Secret");
    let secret_name = str_of(&secret["metadata"]["name"], "Secret name");
    let mounts = |container: &str| -> Vec<(String, Value, bool)> {
        let c = named(&spec["initContainers"], container, "initContainers");
        array(&c["volumeMounts"], "volumeMounts")
            .iter()
            .map(|m| {
                let volume = named(&spec["volumes"], str_of(&m["name"], "name"), "volumes").clone();
                (
                    str_of(&m["mountPath"], "mountPath").to_owned(),
                    volume,
                    m["readOnly"] == true,
                )
            })
            .collect()
    };
    // The volume (and whether read-only) that holds `file` in `container`.
    let holder = |container: &str, file: &Path| -> (String, Value, bool) {
        mounts(container)
            .into_iter()
            .find(|(path, _, _)| file.parent() == Some(Path::new(path)))
            .unwrap_or_else(|| panic!("{container}: nothing mounted at {}", file.display()))
    };
    let secret_key_at = |volume: &Value, file: &Path| -> String {
        assert_eq!(volume["secret"]["secretName"], secret_name, "{volume}");
        let name = file.file_name().unwrap().to_str().unwrap();
        let item = array(&volume["secret"]["items"], "items")
            .iter()
            .find(|i| i["path"] == name)
            .unwrap_or_else(|| panic!("the Secret volume has no item at {name}"));
        let key = str_of(&item["key"], "key").to_owned();
        assert!(
            secret["stringData"][&key].is_string(),
            "secret.yaml has no key {key}"
        );
        key
    };

    // The key that seals the shared refresh token: a read-only Secret item in the container.
    if let Some(file) = config.shared.as_ref().and_then(|s| s.key_file.as_deref()) {
        let (_, volume, read_only) = holder("pcgate", file);
        assert!(read_only, "shared.key_file: mount secrets read-only");
        secret_key_at(&volume, file);
    }
    assert!(!config.credentials.is_empty());
    for (name, credential) in &config.credentials {
        if let Some(file) = credential.client_secret_file() {
            let (_, volume, read_only) = holder("pcgate", file);
            assert!(read_only, "credential {name}: mount secrets read-only");
            secret_key_at(&volume, file);
        }
        if let Some(file) = credential.refresh_token_file() {
            // pcgate writes rotated tokens next to the file: a writable emptyDir...
            let (path, volume, read_only) = holder("pcgate", file);
            assert!(!read_only, "credential {name}: {path} must be writable");
            assert!(volume["emptyDir"].is_object() || volume["persistentVolumeClaim"].is_object());
            // ...that the seed step fills from the Secret.
            let (_, same, _) = holder("seed-refresh-token", file);
            assert_eq!(same["name"], volume["name"]);
            let seed = mounts("seed-refresh-token")
                .into_iter()
                .find(|(_, v, _)| v["secret"].is_object())
                .expect("the seed step mounts the Secret");
            assert_eq!(
                secret_key_at(&seed.1, &Path::new(&seed.0).join("refresh-token")),
                "refresh-token"
            );
            let seed_script = named(
                &spec["initContainers"],
                "seed-refresh-token",
                "initContainers",
            )["command"]
                .to_string();
            assert!(
                seed_script.contains(&file.display().to_string()),
                "{seed_script}"
            );
        }
    }
}

/// Issue 15, item 6: workload identity is the recommended setup the example shows. A credential
/// with `federated_token_file` reads the token where the AKS webhook projects it, in a pod the
/// webhook mutates (labelled `azure.workload.identity/use: "true"`) running as a service account
/// annotated with that credential's client id, which kustomize applies; nothing of the pod's own
/// is mounted over the webhook's path.
#[test]
fn the_example_recommends_workload_identity_as_the_webhook_sets_it_up() {
    const WEBHOOK_TOKEN: &str = "/var/run/secrets/azure/tokens/azure-identity-token";
    let config = pod_config();
    let federated: Vec<(&String, &Path, &str)> = config
        .credentials
        .iter()
        .filter_map(|(name, c)| {
            let app = c.app()?;
            Some((name, c.federated_token_file()?, app.client_id.as_str()))
        })
        .collect();
    assert!(
        !federated.is_empty(),
        "no credential uses workload identity"
    );
    for (name, file, _) in &federated {
        assert_eq!(
            *file,
            Path::new(WEBHOOK_TOKEN),
            "credential {name}: not where the webhook projects the token"
        );
        // Microsoft documents federated credentials on the v2.0 endpoint (a scope, not a
        // resource), as pcgate defaults them when the token URL comes from the environment.
        let app = config.credentials[*name].app().expect("an app credential");
        assert!(
            app.token_url.as_str().ends_with("/oauth2/v2.0/token")
                && matches!(&app.audience, pcgate::config::Audience::Scope(s) if s.ends_with("/.default")),
            "credential {name}: workload identity on the v2 endpoint with a .default scope"
        );
    }
    let deployment = k8s("Deployment");
    let pod = &deployment["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"]["azure.workload.identity/use"], "true",
        "the webhook mutates only labelled pods"
    );
    let account = k8s("ServiceAccount");
    assert_eq!(
        pod["spec"]["serviceAccountName"], account["metadata"]["name"],
        "the pod runs as the annotated service account"
    );
    for (name, _, client_id) in federated {
        assert_eq!(
            account["metadata"]["annotations"]["azure.workload.identity/client-id"], client_id,
            "credential {name}: the service account names another app registration"
        );
    }
    let pcgate = named(&pod["spec"]["initContainers"], "pcgate", "initContainers");
    for mount in array(&pcgate["volumeMounts"], "volumeMounts") {
        let path = str_of(&mount["mountPath"], "mountPath");
        assert!(
            !is_within(WEBHOOK_TOKEN, path),
            "{path} hides the webhook's token"
        );
    }
    // The webhook puts the token and the AZURE_* variables in every container it is not told to
    // skip; with that token any container could get the partner's app token from Entra ID itself.
    // So every container and init container but pcgate is skipped.
    let skipped: BTreeSet<&str> = str_of(
        &pod["metadata"]["annotations"]["azure.workload.identity/skip-containers"],
        "the pod annotation azure.workload.identity/skip-containers",
    )
    .split(';')
    .map(str::trim)
    .filter(|name| !name.is_empty())
    .collect();
    let spec = &pod["spec"];
    let containers = array(&spec["initContainers"], "initContainers")
        .iter()
        .chain(array(&spec["containers"], "containers"));
    let mut others = 0;
    for container in containers {
        let name = str_of(&container["name"], "container name");
        if name == "pcgate" {
            assert!(!skipped.contains(name), "pcgate needs the webhook's token");
        } else {
            others += 1;
            assert!(
                skipped.contains(name),
                "container {name} would get the webhook's token: list it in \
                 azure.workload.identity/skip-containers"
            );
        }
    }
    assert!(others >= 2, "the billing app and the seed step");
    let kustomization = k8s("Kustomization");
    let resources = array(&kustomization["resources"], "resources");
    assert!(
        resources.iter().any(|r| r == "serviceaccount.yaml"),
        "kustomize must apply the service account"
    );
}

#[test]
fn the_example_secret_holds_only_placeholders_and_is_not_applied_by_kustomize() {
    let secret = k8s("Secret");
    let data = secret["stringData"].as_object().expect("stringData");
    assert!(data.contains_key("client-secret") && data.contains_key("refresh-token"));
    for (key, value) in data {
        assert!(
            str_of(value, key).contains("PLACEHOLDER"),
            "{key} must be a placeholder"
        );
    }
    let kustomization = k8s("Kustomization");
    let resources: Vec<&str> = array(&kustomization["resources"], "resources")
        .iter()
        .map(|r| str_of(r, "resource"))
        .collect();
    assert!(
        !resources.contains(&"secret.yaml"),
        "kustomize would overwrite the real Secret"
    );
    for resource in resources {
        assert!(
            root().join("deploy/kubernetes").join(resource).is_file(),
            "{resource}"
        );
    }
}

/// What pcgate exports: each series name with its label names, and for the bounded labels the
/// values the code can produce. Built from the real registry with every label value filled in.
struct Catalog {
    series: BTreeMap<String, BTreeSet<String>>,
    values: BTreeMap<(String, String), BTreeSet<String>>,
}

/// Labels Prometheus adds to every series from the scrape target.
const TARGET_LABELS: &[&str] = &["job", "instance", "namespace", "pod", "container"];
/// Labels whose values come from the config or the build, not from a fixed set.
const OPEN_LABELS: &[&str] = &["route", "credential", "version", "le"];

fn catalog() -> Catalog {
    let m = std::sync::Arc::new(Metrics::new());
    let route = || std::sync::Arc::<str>::from("r");
    let classes: BTreeSet<&str> = (100..600)
        .map(|s| status_class(http::StatusCode::from_u16(s).unwrap()))
        .collect();
    // The layers register their own families, every label value they can produce at zero.
    assert_eq!(
        classes,
        pcgate::metrics::STATUS_CLASSES
            .into_iter()
            .collect::<BTreeSet<_>>(),
        "the status classes exported at start are all the ones a status can have"
    );
    let _observe = pcgate::layer::observe::ObserveLayer::new(&m, &["r"]);
    let tls = pcgate::upstream::tls_config(None).unwrap();
    let _upstream = pcgate::upstream::Upstream::new(
        &pcgate::config::UpstreamConfig::default(),
        tls,
        &m,
        &["r"],
    );
    // The cache layer and its store register their own families, every result at zero.
    assert_eq!(
        [
            CacheStatus::Hit,
            CacheStatus::Miss,
            CacheStatus::Stale,
            CacheStatus::Bypass,
        ]
        .map(CacheStatus::as_str),
        pcgate::metrics::CACHE_RESULTS,
        "the cache results exported at start are all the ones the cache can report"
    );
    let store = std::sync::Arc::new(pcgate::layer::cache::MemoryStore::new(1 << 20, 1 << 16, &m));
    let _cache = pcgate::layer::cache::CacheLayer::new(
        store,
        1 << 16,
        m.clone(),
        std::time::Duration::from_secs(60),
    )
    .routes(&["r"]);
    m.coalesced
        .get_or_create(&RouteLabel { route: route() })
        .inc();
    // The shared tier ([shared]) registers its own families, every label at zero.
    let _shared = pcgate::shared::SharedMetrics::register(&m);
    // The retry layer registers its own families, every reason at zero.
    let _retry = pcgate::layer::retry::RetryLayer::new(
        pcgate::layer::retry::RetrySettings::new(
            &pcgate::config::RetryConfig::default(),
            std::time::Duration::from_secs(60),
        ),
        &m,
    );
    // The limit layer registers its own families, every cause, origin and scope at zero.
    let _limit = pcgate::layer::limit::LimitLayer::new(
        pcgate::layer::limit::LimitSettings {
            rate: None,
            max_hold: std::time::Duration::from_secs(30),
            deadline: std::time::Duration::from_secs(60),
        },
        &m,
    );
    // Shared refresh tokens: every outcome of each sharing credential at zero.
    pcgate::shared::tokens::ShareMetrics::register(&m).prime("c");
    for result in ["ok", "error"] {
        m.token_refreshes
            .get_or_create(&TokenLabels {
                credential: "c".into(),
                result,
            })
            .inc();
    }
    m.token_expiry
        .get_or_create(&CredentialLabel {
            credential: "c".into(),
        })
        .set(1);
    m.token_store_failures
        .get_or_create(&CredentialLabel {
            credential: "c".into(),
        })
        .inc();

    let mut catalog = Catalog {
        series: BTreeMap::new(),
        values: BTreeMap::new(),
    };
    for line in m
        .encode()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = line.find(['{', ' ']).expect("a sample line");
        let name = line[..name_end].to_owned();
        let labels = catalog.series.entry(name.clone()).or_default();
        if line[name_end..].starts_with('{') {
            let body = &line[name_end + 1..line.find('}').expect("closing brace")];
            for pair in body.split(',') {
                let (key, value) = pair.split_once('=').expect("key=value");
                labels.insert(key.to_owned());
                catalog
                    .values
                    .entry((name.clone(), key.to_owned()))
                    .or_default()
                    .insert(value.trim_matches('"').to_owned());
            }
        }
    }
    catalog
}

/// The families a PromQL expression uses, checked against the catalog: names, the labels in
/// selectors and groupings, and the values of bounded labels. Returns the series names.
fn check_promql(expr: &str, catalog: &Catalog, context: &str) -> BTreeSet<String> {
    let all_labels: BTreeSet<&str> = catalog
        .series
        .values()
        .flatten()
        .map(String::as_str)
        .chain(TARGET_LABELS.iter().copied())
        .collect();
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut used = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        if !ident(bytes[i]) || (i > 0 && ident(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && ident(bytes[i]) {
            i += 1;
        }
        let word = &expr[start..i];
        let rest = expr[i..].trim_start();
        if ["by", "without", "on", "ignoring"].contains(&word) && rest.starts_with('(') {
            let list = &rest[1..rest.find(')').expect("closing parenthesis")];
            for label in list.split(',').map(str::trim).filter(|l| !l.is_empty()) {
                assert!(
                    all_labels.contains(label),
                    "{context}: no metric has label `{label}` in {expr}"
                );
            }
            continue;
        }
        if !word.starts_with("pcgate_") && !word.starts_with("process_") {
            continue;
        }
        let labels = catalog
            .series
            .get(word)
            .unwrap_or_else(|| panic!("{context}: pcgate exports no series `{word}` ({expr})"));
        used.insert(word.to_owned());
        if !expr[i..].starts_with('{') {
            continue;
        }
        let close = i + expr[i..].find('}').expect("closing brace");
        for matcher in expr[i + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
        {
            let op_at = matcher.find(['=', '!']).expect("a label matcher");
            let label = matcher[..op_at].trim();
            let value = matcher[op_at..]
                .trim_start_matches(['=', '!', '~'])
                .trim()
                .trim_matches('"');
            assert!(
                labels.contains(label) || TARGET_LABELS.contains(&label),
                "{context}: {word} has no label `{label}` ({expr})"
            );
            if value.contains('$') || OPEN_LABELS.contains(&label) || TARGET_LABELS.contains(&label)
            {
                continue;
            }
            let known = &catalog.values[&(word.to_owned(), label.to_owned())];
            for alternative in value.split('|') {
                assert!(
                    known.contains(alternative),
                    "{context}: {word}{{{label}}} is never `{alternative}`; it is one of {known:?}"
                );
            }
        }
        i = close + 1;
    }
    used
}

#[test]
fn the_promql_checker_catches_wrong_names_labels_and_values() {
    let catalog = catalog();
    let ok = check_promql(
        r#"sum by (route) (rate(pcgate_cache_lookups_total{result=~"hit|stale", instance=~"$i"}[5m]))"#,
        &catalog,
        "ok",
    );
    assert_eq!(
        ok.into_iter().collect::<Vec<_>>(),
        ["pcgate_cache_lookups_total"]
    );
    for bad in [
        "rate(pcgate_cache_lookup_total[5m])",
        r#"rate(pcgate_cache_lookups_total{status="hit"}[5m])"#,
        r#"rate(pcgate_cache_lookups_total{result="hits"}[5m])"#,
        "sum by (path) (rate(pcgate_requests_total[5m]))",
    ] {
        let caught = std::panic::catch_unwind(|| check_promql(bad, &catalog, "bad")).is_err();
        assert!(caught, "not caught: {bad}");
    }
}

#[test]
fn every_alert_has_severity_summary_runbook_and_queries_real_metrics() {
    let catalog = catalog();
    let path = root().join("deploy/prometheus/alerts.yml");
    let rules = yaml_docs(&path).remove(0);
    let mut alerts = BTreeSet::new();
    for group in array(&rules["groups"], "groups") {
        for rule in array(&group["rules"], "rules") {
            let name = str_of(&rule["alert"], "alert").to_owned();
            let severity = str_of(&rule["labels"]["severity"], &name);
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: severity {severity}"
            );
            for key in ["summary", "description", "runbook"] {
                let text = str_of(&rule["annotations"][key], &format!("{name} {key}"));
                assert!(text.len() > 20, "{name}: {key} too short");
            }
            let used = check_promql(str_of(&rule["expr"], &name), &catalog, &name);
            assert!(!used.is_empty(), "{name}: queries no pcgate metric");
            alerts.insert(name);
        }
    }
    for expected in [
        "PcgateTokenRefreshFailing",
        "PcgateNoValidToken",
        "PcgateUpstreamErrorRatioHigh",
        "PcgateRetryBudgetExhausted",
        "PcgateCacheHitRatioLow",
        "PcgateRefreshTokenNotSaved",
        "PcgateSharedTierDown",
    ] {
        assert!(alerts.contains(expected), "alerts.yml has no {expected}");
    }

    // The unit tests load alerts.yml and test alerts that exist, at least two of them.
    let tests = yaml_docs(&root().join("deploy/prometheus/alerts.test.yml")).remove(0);
    assert_eq!(tests["rule_files"], serde_json::json!(["alerts.yml"]));
    let tested: BTreeSet<&str> = array(&tests["tests"], "tests")
        .iter()
        .flat_map(|t| array(&t["alert_rule_test"], "alert_rule_test"))
        .map(|t| str_of(&t["alertname"], "alertname"))
        .collect();
    assert!(tested.len() >= 2, "{tested:?}");
    for name in tested {
        assert!(
            alerts.contains(name),
            "alerts.test.yml tests unknown alert {name}"
        );
    }
}

#[test]
fn the_dashboard_has_the_panels_and_queries_only_real_metrics() {
    let catalog = catalog();
    let path = root().join("deploy/grafana/pcgate.json");
    let dashboard: Value = serde_json::from_str(&read(&path)).expect("the dashboard is JSON");
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36,
        "schemaVersion"
    );

    let variables = &dashboard["templating"]["list"];
    let datasource = named(variables, "datasource", "templating");
    assert_eq!(datasource["type"], "datasource");
    assert_eq!(datasource["query"], "prometheus");
    assert_eq!(named(variables, "route", "templating")["type"], "query");

    let panels = array(&dashboard["panels"], "panels");
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    let mut titles = Vec::new();
    for panel in panels {
        let title = str_of(&panel["title"], "title").to_owned();
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate id: {title}"
        );
        assert!(panel["gridPos"]["w"].is_u64(), "{title}: gridPos");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{title}: datasource"
        );
        let targets = array(&panel["targets"], &title);
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            let expr = str_of(&target["expr"], &title);
            let found = check_promql(expr, &catalog, &title);
            assert!(!found.is_empty(), "{title}: queries no pcgate metric");
            used.extend(found);
        }
        titles.push(title.to_lowercase());
    }
    for wanted in [
        "request rate",
        "p50 / p95 / p99",
        "cache hit ratio",
        "upstream attempts by outcome",
        "retries by reason",
        "token expiry",
        "in-flight",
        "cache size",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel about {wanted}: {titles:?}"
        );
    }
    // Every family pcgate exports is on the dashboard somewhere.
    let families = |names: &mut dyn Iterator<Item = &String>| -> BTreeSet<String> {
        names
            .map(|n| {
                let n = n.strip_suffix("_bucket").unwrap_or(n);
                let n = n.strip_suffix("_count").unwrap_or(n);
                n.strip_suffix("_sum").unwrap_or(n).to_owned()
            })
            .collect()
    };
    let exported = families(&mut catalog.series.keys());
    let shown = families(&mut used.iter());
    let missing: Vec<_> = exported.difference(&shown).collect();
    assert!(missing.is_empty(), "metrics on no panel: {missing:?}");
}

#[test]
fn the_sidecars_share_the_tenants_redis_with_the_password_from_the_secret() {
    let config = pod_config();
    let shared = config.shared.as_ref().expect("the ConfigMap's [shared]");
    assert!(!shared.namespace.is_empty());
    // The ConfigMap holds no password: the URL with one comes from the Secret.
    let url = url::Url::parse(&shared.redis_url.to_string()).expect("a URL");
    assert_eq!(url.password(), None, "no password in the ConfigMap");
    let secret = k8s("Secret");
    let secret_name = str_of(&secret["metadata"]["name"], "Secret name");
    let deployment = k8s("Deployment");
    let pcgate = named(
        &deployment["spec"]["template"]["spec"]["initContainers"],
        "pcgate",
        "initContainers",
    );
    let env = named(&pcgate["env"], "PCGATE_SHARED__REDIS_URL", "pcgate env");
    let from = &env["valueFrom"]["secretKeyRef"];
    assert_eq!(from["name"], secret_name);
    let key = str_of(&from["key"], "secretKeyRef key");
    let secret_url = url::Url::parse(str_of(&secret["stringData"][key], key)).expect("a URL");
    // The Secret's URL and the ConfigMap's name the same Service, the one redis.yaml defines.
    let service = k8s("Service");
    let port = array(&service["spec"]["ports"], "ports")[0]["port"]
        .as_u64()
        .unwrap();
    for url in [&url, &secret_url] {
        assert_eq!(
            url.host_str(),
            service["metadata"]["name"].as_str(),
            "{url}"
        );
        assert_eq!(
            url.port_or_known_default().map(u64::from),
            Some(port),
            "{url}"
        );
    }
    // The Service selects the Redis pods, which take the password from the same Secret and keep
    // nothing on disk.
    let redis = k8s("StatefulSet");
    let labels = &redis["spec"]["template"]["metadata"]["labels"];
    for (label, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &labels[label], value,
            "the Service does not select the Redis pods"
        );
    }
    let container = &array(
        &redis["spec"]["template"]["spec"]["containers"],
        "containers",
    )[0];
    let args: Vec<&str> = array(&container["args"], "args")
        .iter()
        .map(|a| str_of(a, "arg"))
        .collect();
    for pair in [["--save", ""], ["--appendonly", "no"]] {
        assert!(args.windows(2).any(|w| w == pair), "{args:?}");
    }
    let password = named(&container["env"], "REDIS_PASSWORD", "redis env");
    assert_eq!(password["valueFrom"]["secretKeyRef"]["name"], secret_name);
    let password_key = str_of(&password["valueFrom"]["secretKeyRef"]["key"], "key");
    assert!(secret["stringData"][password_key].is_string());
    let kustomization = k8s("Kustomization");
    assert!(array(&kustomization["resources"], "resources")
        .iter()
        .any(|r| r == "redis.yaml"));
}
