//! docker/ and packaging/ without a Docker engine (none runs where these tests run): the
//! compose file parses and names files that exist, the Dockerfile copies files that exist
//! and builds with the command the READMEs give, the ports, volumes, paths and health check
//! of the Dockerfile, compose.yaml and config/docker.yaml agree, the config compose mounts
//! passes `mqgate check`, and the systemd unit passes `systemd-analyze verify` where
//! systemd-analyze exists.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_saphyr::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

/// One Dockerfile instruction: its keyword and the rest, continuation lines joined.
struct Instruction {
    keyword: String,
    args: String,
}

fn dockerfile() -> Vec<Instruction> {
    let text = read("docker/Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, args) = current.split_once(' ').unwrap_or((&current, ""));
                out.push(Instruction {
                    keyword: keyword.to_ascii_uppercase(),
                    args: args.split_whitespace().collect::<Vec<_>>().join(" "),
                });
                current.clear();
            }
        }
    }
    assert!(current.is_empty(), "the Dockerfile ends inside a continued line");
    out
}

/// The `cargo ...` commands of the Dockerfile's RUN instructions (up to `&&`).
fn cargo_commands(instructions: &[Instruction]) -> Vec<String> {
    instructions
        .iter()
        .filter(|i| i.keyword == "RUN")
        .flat_map(|i| i.args.split("&&").map(str::trim).map(str::to_owned).collect::<Vec<_>>())
        .filter_map(|part| part.find("cargo ").map(|at| part[at..].to_owned()))
        .collect()
}

#[test]
fn dockerfile_copies_what_exists_and_builds_as_the_readme_says() {
    let instructions = dockerfile();
    let froms: Vec<&Instruction> = instructions.iter().filter(|i| i.keyword == "FROM").collect();
    assert!(froms.len() >= 2, "a multi-stage build");
    assert!(froms[0].args.ends_with("AS build"), "the first stage builds: {}", froms[0].args);
    assert!(froms.last().unwrap().args.contains("-slim"), "a small runtime image");

    // The builder's Rust is the oldest that builds mqgate (Cargo.toml's rust-version).
    let manifest = read("Cargo.toml");
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("rust-version in Cargo.toml");
    assert!(
        instructions.iter().any(|i| i.keyword == "ARG" && i.args == format!("RUST_VERSION={msrv}")),
        "ARG RUST_VERSION={msrv} (Cargo.toml's rust-version)"
    );

    // Every COPY source (the context is the repository root) exists and is not ignored.
    let ignore = read("docker/Dockerfile.dockerignore");
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    assert!(ignored.contains(&"target") && ignored.contains(&".git"), "{ignored:?}");
    let mut copied = 0;
    for copy in instructions.iter().filter(|i| i.keyword == "COPY") {
        if copy.args.starts_with("--from=") {
            continue;
        }
        let words: Vec<&str> = copy.args.split(' ').filter(|w| !w.starts_with("--")).collect();
        let (sources, _dest) = words.split_at(words.len() - 1);
        for source in sources {
            assert!(repo().join(source).exists(), "COPY {source}: no such file in the repository");
            let first = source.split('/').next().unwrap_or(source);
            assert!(
                !ignored.contains(&first),
                "COPY {source}, but the .dockerignore leaves it out"
            );
            copied += 1;
        }
    }
    assert!(copied >= 4, "Cargo.toml, Cargo.lock, src, bench at least");
    // What the workspace needs to build: every member's folder is copied.
    for member in ["src", "bench"] {
        assert!(
            instructions.iter().any(|i| i.keyword == "COPY" && i.args.starts_with(member)),
            "{member} is not copied"
        );
    }

    // The build command is the one the READMEs give.
    let commands = cargo_commands(&instructions);
    assert_eq!(commands, ["cargo build --release --locked --bin mqgate"], "{commands:?}");
    for readme in ["README.md", "docker/README.md"] {
        assert!(read(readme).contains(&commands[0]), "{readme} does not give `{}`", commands[0]);
    }

    // Runs as an unprivileged user, with a health check on /readyz and volumes for the store
    // and the config.
    let last_from = instructions.iter().rposition(|i| i.keyword == "FROM").unwrap();
    let runtime = &instructions[last_from..];
    let user = runtime.iter().find(|i| i.keyword == "USER").expect("USER in the runtime stage");
    assert!(user.args != "root" && user.args != "0", "runs as root");
    let health = runtime.iter().find(|i| i.keyword == "HEALTHCHECK").expect("HEALTHCHECK");
    assert!(health.args.contains("http://127.0.0.1:9090/readyz"), "{}", health.args);
    let volume = runtime.iter().find(|i| i.keyword == "VOLUME").expect("VOLUME");
    for dir in ["/var/lib/mqgate", "/etc/mqgate"] {
        assert!(volume.args.contains(&format!("\"{dir}\"")), "VOLUME {dir}: {}", volume.args);
    }
    let expose = runtime.iter().find(|i| i.keyword == "EXPOSE").expect("EXPOSE");
    assert_eq!(expose.args, "1883 8883 9090");
    let cmd = runtime.iter().find(|i| i.keyword == "CMD").expect("CMD");
    assert!(cmd.args.contains("\"/etc/mqgate/mqgate.yaml\""), "{}", cmd.args);
}

#[test]
fn compose_file_parses_and_names_files_that_exist() {
    let compose = yaml("docker/compose.yaml");
    let base = repo().join("docker");
    let services = compose["services"].as_object().expect("services:");
    let mqgate = &services["mqgate"];
    let rabbit = &services["rabbitmq"];

    let image = rabbit["image"].as_str().expect("rabbitmq image");
    assert!(image.contains("management"), "RabbitMQ with its management UI: {image}");
    assert!(ports(rabbit).contains(&"15672:15672".to_owned()), "the management UI's port");

    let build = &mqgate["build"];
    let context = base.join(build["context"].as_str().expect("build.context"));
    let dockerfile = context.join(build["dockerfile"].as_str().expect("build.dockerfile"));
    assert!(
        dockerfile.canonicalize().ok() == Some(base.join("Dockerfile").canonicalize().unwrap()),
        "build names docker/Dockerfile: {}",
        dockerfile.display()
    );
    assert_eq!(
        context.canonicalize().unwrap(),
        repo().canonicalize().unwrap(),
        "context: the repo"
    );

    assert_eq!(mqgate["depends_on"]["rabbitmq"]["condition"], "service_healthy");
    for (name, service) in services {
        let test = service["healthcheck"]["test"].as_array().expect("a healthcheck");
        assert!(!test.is_empty(), "{name}: empty healthcheck");
    }
    let test: Vec<&str> = mqgate["healthcheck"]["test"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(test.contains(&"http://127.0.0.1:9090/readyz"), "{test:?}");
    for port in ["1883:1883", "8883:8883", "9090:9090"] {
        assert!(ports(mqgate).contains(&port.to_owned()), "mqgate publishes {port}");
    }

    // Bind mounts name files that exist; the config is mounted where the command reads it.
    let mut config_target = None;
    for volume in mqgate["volumes"].as_array().expect("volumes") {
        let volume = volume.as_str().expect("short volume syntax");
        let mut parts = volume.split(':');
        let (source, target) = (parts.next().unwrap(), parts.next().expect("a target"));
        if source.starts_with('.') || source.starts_with('/') {
            assert!(base.join(source).exists(), "volume {volume}: {source} does not exist");
        } else {
            let named = compose["volumes"].as_object().expect("top-level volumes:");
            assert!(named.contains_key(source), "named volume {source} is not declared");
        }
        if source == "../config/docker.yaml" {
            config_target = Some(target.to_owned());
        }
    }
    let config_target = config_target.expect("config/docker.yaml is mounted");
    let command: Vec<&str> =
        mqgate["command"].as_array().expect("command").iter().filter_map(Value::as_str).collect();
    let at = command.iter().position(|a| *a == "--config").expect("--config");
    assert_eq!(command[at + 1], config_target, "the command reads the mounted config");
    assert!(
        mqgate["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v.as_str().is_some_and(|v| v.ends_with(":/var/lib/mqgate"))),
        "the store's volume"
    );

    // Every ${env:NAME} of the mounted config is set in the service's environment.
    let config = read("config/docker.yaml");
    let env = mqgate["environment"].as_object().expect("environment: as a map");
    let mut names = 0;
    let mut rest = config.as_str();
    while let Some(at) = rest.find("${env:") {
        rest = &rest[at + "${env:".len()..];
        let name = &rest[..rest.find('}').expect("closed ${env:...}")];
        assert!(env.contains_key(name), "{name} is read by config/docker.yaml but not set");
        names += 1;
    }
    assert!(names >= 1, "the admin token comes from the environment");
}

/// A service's `ports:` as written.
fn ports(service: &Value) -> Vec<String> {
    service["ports"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

#[test]
fn docker_config_passes_mqgate_check_and_matches_the_image() {
    let config = yaml("config/docker.yaml");
    assert_eq!(config["store"]["path"], "/var/lib/mqgate", "the image's store volume");
    assert_eq!(config["admin"]["listen"], "0.0.0.0:9090", "the port HEALTHCHECK asks");
    assert_eq!(config["mqtt"]["listen"], "0.0.0.0:1883");
    assert_eq!(config["mqtt"]["listeners"][0]["listen"], "0.0.0.0:8883");

    // Checked where compose puts it: beside tls/ with the certificate files.
    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).expect("mkdir tls");
    crate::support::certs::Ca::new(&tls, "docker").server("server");
    let path = dir.path().join("mqgate.yaml");
    std::fs::copy(repo().join("config/docker.yaml"), &path).expect("copy");
    let check = |token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqgate"));
        cmd.args(["check", "--config"]).arg(&path).env_remove("MQGATE_ADMIN_TOKEN");
        if let Some(t) = token {
            cmd.env("MQGATE_ADMIN_TOKEN", t);
        }
        cmd.output().expect("run mqgate check")
    };
    let ok = check(Some("a-token-of-32-characters-or-so.."));
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // The token is required (admin.listen is not loopback) and comes from the environment.
    let unset = check(None);
    assert_eq!(unset.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unset.stderr).contains("MQGATE_ADMIN_TOKEN"));
    // Without the certificates the TLS listener is refused: the check reads them.
    std::fs::remove_dir_all(&tls).expect("rm tls");
    let no_certs = check(Some("a-token-of-32-characters-or-so.."));
    assert_eq!(no_certs.status.code(), Some(2), "the certificate files are checked");
}

#[test]
fn systemd_unit_is_hardened_and_passes_systemd_analyze() {
    let unit = read("packaging/mqgate.service");
    for line in [
        "DynamicUser=yes",
        "StateDirectory=mqgate",
        "ConfigurationDirectory=mqgate",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit has no {line:?}");
    }
    let exec = |key: &str| {
        unit.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key}"))
    };
    assert_eq!(exec("ExecStart="), "/usr/local/bin/mqgate run --config /etc/mqgate/mqgate.yaml");

    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        eprintln!("systemd-analyze is not installed: the unit's syntax is not verified here");
        return;
    }
    // `verify` wants the binaries to exist: the unit as installed, pointing at this build.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mqgate.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/mqgate", env!("CARGO_BIN_EXE_mqgate")))
        .expect("write unit");
    let out = Command::new(analyze).arg("verify").arg(&path).output().expect("systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // An unknown key or a bad value is only a warning (exit 0): any output is a failure.
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify:\n{stderr}");

    // The hardening as systemd scores it (0 = locked down, 10 = exposed).
    let out = Command::new(analyze)
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let level = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for mqgate.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse::<f64>().ok());
    match level {
        Some(level) => assert!(level <= 2.0, "exposure {level}:\n{text}"),
        None => eprintln!(
            "systemd-analyze security --offline gave no level (older systemd?): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}
