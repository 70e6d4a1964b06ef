//! The deploy/ files a user installs by hand, run for real: the systemd unit checked by
//! `systemd-analyze verify` and `security` in a root directory holding the built binary, and
//! `deploy/make-client-cert`'s CA, client certificate and PKCS#12 bundle, checked by openssl and
//! by a real Traefik 3.7 applying `deploy/traefik/dynamic/mtls.yml` to curl clients on loopback.
//! Missing tools fail with the command that installs them (nothing is skipped).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::BIN;
use common::proxies::{deploy_dir, tool};
use common::traefik::{Traefik, entrypoint};
use common::upstream::{self, Mode, StandIn, yaml_to_json};
use serde_json::json;

const UNIT: &str = "gatekeeper.service";
/// The bundle's password in these tests.
const PASSWORD: &str = "correct horse battery staple";
/// Where mtls.yml reads the CA (in the Traefik container of deploy/compose.yaml).
const CA_IN_TRAEFIK: &str = "/etc/traefik/certs/client-ca.pem";

fn systemd_analyze() -> PathBuf {
    tool("systemd-analyze", "apt-get install -y systemd")
}

fn openssl() -> PathBuf {
    tool("openssl", "apt-get install -y openssl")
}

/// `program` with a clean environment (PATH kept) and no stdin.
fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null());
    cmd
}

/// Run `cmd` to its end.
fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------------
// The systemd unit
// ---------------------------------------------------------------------------------------------

/// The active `Key=value` lines of a unit file, in order.
fn unit_settings(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not a setting: {l}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// A root directory for `systemd-analyze --root`: the host's unit directory (for the targets
/// the unit is ordered after), `unit` as /etc/systemd/system/gatekeeper.service, the built
/// binary as /usr/local/bin/gatekeeper, and every other program an `Exec*=` line names, copied
/// from this host.
fn systemd_root(unit: &str) -> tempfile::TempDir {
    // Beside the binary, so that it can be hard-linked instead of copied.
    let root = tempfile::Builder::new()
        .prefix("systemd-root-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp root");
    let units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|d| Path::new(d).join("sysinit.target").exists())
        .expect("no systemd unit directory with sysinit.target: apt-get install -y systemd");
    std::fs::create_dir_all(root.path().join("usr/lib/systemd")).unwrap();
    let out = output(
        command("cp")
            .arg("-R")
            .arg(units)
            .arg(root.path().join("usr/lib/systemd/system")),
    );
    assert!(out.status.success(), "copy {units}: {}", text(&out));
    let etc = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join(UNIT), unit).unwrap();
    for (key, value) in unit_settings(unit) {
        if !key.starts_with("Exec") {
            continue;
        }
        // `-`, `@`, `+`, `!`, `:` prefixes change how systemd runs the program, not which.
        let program = value
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .trim_start_matches(['-', '@', '+', '!', ':']);
        assert!(
            program.starts_with('/'),
            "{key}= names {program:?}: use an absolute path"
        );
        let to = root.path().join(program.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        if program == "/usr/local/bin/gatekeeper" {
            if std::fs::hard_link(BIN, &to).is_err() {
                std::fs::copy(BIN, &to).expect("copy the gatekeeper binary");
            }
        } else if Path::new(program).is_file() {
            // A program this host lacks is left out: verify names it.
            std::fs::copy(program, &to).unwrap_or_else(|e| panic!("copy {program}: {e}"));
        }
    }
    root
}

/// `systemd-analyze verify` on `unit`: its complaints (empty when it has none; a warning such
/// as an unknown key counts, though the tool exits 0 for it).
fn verify(unit: &str) -> String {
    let root = systemd_root(unit);
    let out = output(
        command(systemd_analyze())
            .arg("verify")
            .arg(format!("--root={}", root.path().display()))
            .arg(UNIT),
    );
    let said = text(&out);
    match (out.status.success(), said.trim().is_empty()) {
        (true, true) => String::new(),
        (true, false) => said,
        (false, _) => format!("exit {}: {said}", out.status),
    }
}

fn shipped_unit() -> String {
    std::fs::read_to_string(deploy_dir().join(UNIT)).expect("read deploy/gatekeeper.service")
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = shipped_unit();
    let complaints = verify(&unit);
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify deploy/{UNIT}:\n{complaints}"
    );
    // The settings its comments tell users to uncomment are valid too.
    let mut optional = unit.clone();
    for key in [
        "LoadCredential",
        "Environment",
        "ReadWritePaths",
        "SupplementaryGroups",
    ] {
        let commented = format!("\n#{key}=");
        assert!(
            optional.contains(&commented),
            "no commented-out {key}= any more: update this test"
        );
        optional = optional.replace(&commented, &format!("\n{key}="));
    }
    let complaints = verify(&optional);
    assert!(
        complaints.is_empty(),
        "with the optional settings:\n{complaints}"
    );
    // The check is not vacuous: the same unit with a typo, or a program that is not there, fails.
    let typo = unit.replace("ProtectHome=", "ProtectHoem=");
    assert!(
        verify(&typo).contains("ProtectHoem"),
        "verify missed an unknown key"
    );
    let missing = unit.replace("/bin/kill", "/bin/no-such-kill");
    assert!(
        verify(&missing).contains("no-such-kill"),
        "verify missed a missing program"
    );
}

#[test]
fn systemd_unit_is_hardened() {
    let root = systemd_root(&shipped_unit());
    // Exposure 0 (locked down) .. 10 (unsafe), times 10 for --threshold.
    let out = output(
        command(systemd_analyze())
            .args(["security", "--offline=yes", "--threshold=20"])
            .arg(format!("--root={}", root.path().display()))
            .arg(UNIT),
    );
    let said = text(&out);
    let level = said
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or("(no overall exposure level)");
    assert!(
        out.status.success(),
        "deploy/{UNIT} is exposed above 2.0: {level}\n{said}"
    );
}

#[test]
fn systemd_unit_runs_the_documented_paths_writes_only_its_state_directory_and_reloads_on_hup() {
    let settings = unit_settings(&shipped_unit());
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(
        get("ExecStart"),
        ["/usr/local/bin/gatekeeper serve --config /etc/gatekeeper/gatekeeper.yaml"]
    );
    assert_eq!(get("ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(get("DynamicUser"), ["yes"]);
    // The dynamic user can write only its StateDirectory (ProtectSystem=strict); the working
    // directory is that directory, so the policy's relative default paths land there too.
    assert_eq!(get("ProtectSystem"), ["strict"]);
    assert_eq!(get("StateDirectory"), ["gatekeeper"]);
    assert_eq!(get("WorkingDirectory"), ["/var/lib/gatekeeper"]);
    assert_eq!(get("ConfigurationDirectory"), ["gatekeeper"]);
    assert_eq!(get("RestrictAddressFamilies"), ["AF_INET AF_INET6 AF_UNIX"]);
    // A ReadWritePaths= directory that does not exist stops the service from starting: none
    // ships active (the comments say how to add the one Traefik watches).
    assert_eq!(get("ReadWritePaths"), Vec::<&str>::new());
}

// ---------------------------------------------------------------------------------------------
// deploy/make-client-cert
// ---------------------------------------------------------------------------------------------

/// Run `deploy/make-client-cert args` with `P12_PASSWORD` (when given) and no terminal.
fn make_client_cert(args: &[&str], password: Option<&str>) -> Output {
    let mut cmd = command(deploy_dir().join("make-client-cert"));
    cmd.args(args);
    if let Some(p) = password {
        cmd.env("P12_PASSWORD", p);
    }
    output(&mut cmd)
}

/// `make-client-cert ca DIR` then `client DIR NAME`, both succeeding.
fn make_ca_and_client(dir: &Path, name: &str) {
    let d = dir.to_str().unwrap();
    let out = make_client_cert(&["ca", d], None);
    assert!(out.status.success(), "ca: {}", text(&out));
    let out = make_client_cert(&["client", d, name], Some(PASSWORD));
    assert!(out.status.success(), "client {name}: {}", text(&out));
}

/// Run openssl with `P12_PASSWORD` set; (success, everything it printed).
fn openssl_run(args: &[&str]) -> (bool, String) {
    let out = output(command(openssl()).args(args).env("P12_PASSWORD", PASSWORD));
    (out.status.success(), text(&out))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn make_client_cert_makes_a_ca_and_a_phone_certificate_openssl_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    make_ca_and_client(&certs, "phone");
    let path = |name: &str| certs.join(name).to_str().unwrap().to_string();
    let ca = path("client-ca.pem");

    // Private keys and the bundle are the owner's only, from the start.
    for name in ["client-ca.key", "phone.key", "phone.p12"] {
        assert_eq!(mode(&certs.join(name)), 0o600, "{name}");
    }

    // The CA: EC P-256, a CA, for 10 years.
    let (ok, ca_text) = openssl_run(&["x509", "-in", &ca, "-noout", "-text"]);
    assert!(ok, "{ca_text}");
    for want in ["NIST CURVE: P-256", "CA:TRUE", "Certificate Sign"] {
        assert!(ca_text.contains(want), "CA lacks {want:?}:\n{ca_text}");
    }
    let year = 365 * 86_400;
    let (lasts_9_years, _) = openssl_run(&[
        "x509",
        "-in",
        &ca,
        "-noout",
        "-checkend",
        &(9 * year).to_string(),
    ]);
    let (lasts_11_years, _) = openssl_run(&[
        "x509",
        "-in",
        &ca,
        "-noout",
        "-checkend",
        &(11 * year).to_string(),
    ]);
    assert!(
        lasts_9_years && !lasts_11_years,
        "the CA is not valid for 10 years"
    );

    // The phone's certificate: CN=phone, signed by the CA, for client authentication.
    let (ok, said) = openssl_run(&[
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        &ca,
        &path("phone.pem"),
    ]);
    assert!(ok && said.contains("phone.pem: OK"), "{said}");
    let (ok, subject) = openssl_run(&[
        "x509",
        "-in",
        &path("phone.pem"),
        "-noout",
        "-subject",
        "-nameopt",
        "RFC2253",
    ]);
    assert!(ok, "{subject}");
    assert_eq!(subject.trim(), "subject=CN=phone");

    // The bundle opens with the password (without -legacy: 3DES is in OpenSSL 3's default
    // provider), in the algorithms old iOS and Android read, and not with another password.
    let p12 = path("phone.p12");
    let (ok, info) = openssl_run(&[
        "pkcs12",
        "-info",
        "-noout",
        "-in",
        &p12,
        "-passin",
        "env:P12_PASSWORD",
    ]);
    assert!(ok, "the bundle does not open with its password: {info}");
    assert!(info.contains("MAC: sha1"), "{info}");
    assert!(
        info.contains("PKCS7 Encrypted data: pbeWithSHA1And3-KeyTripleDES-CBC")
            && info.contains("Shrouded Keybag: pbeWithSHA1And3-KeyTripleDES-CBC"),
        "the bundle is not 3DES-encrypted: {info}"
    );
    let (ok, info) = openssl_run(&[
        "pkcs12",
        "-info",
        "-noout",
        "-in",
        &p12,
        "-passin",
        "pass:wrong",
    ]);
    assert!(!ok, "the bundle opened with a wrong password: {info}");
    // It holds the phone's key and certificate, and not the CA (Android would trust it).
    let (ok, contents) = openssl_run(&[
        "pkcs12",
        "-in",
        &p12,
        "-nodes",
        "-passin",
        "env:P12_PASSWORD",
    ]);
    assert!(ok, "{contents}");
    assert_eq!(
        contents.matches("BEGIN CERTIFICATE").count(),
        1,
        "{contents}"
    );
    assert!(contents.contains("friendlyName: phone"), "{contents}");
    assert!(contents.contains("BEGIN PRIVATE KEY"), "{contents}");
    let cert_in_bundle = &contents[contents.find("-----BEGIN CERTIFICATE").unwrap()..];
    let pem = std::fs::read_to_string(certs.join("phone.pem")).unwrap();
    assert!(
        cert_in_bundle.starts_with(pem.trim()),
        "the bundle holds another certificate"
    );
}

#[test]
fn make_client_cert_refuses_what_would_lose_or_leak_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let refused = |args: &[&str], password: Option<&str>, why: &str| {
        let out = make_client_cert(args, password);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            text(&out).contains(why),
            "{args:?}: expected {why:?} in {}",
            text(&out)
        );
    };
    refused(&["client", d, "phone"], Some(PASSWORD), "no CA in");
    refused(&["bogus"], None, "usage:");
    make_ca_and_client(dir.path(), "phone");
    let ca = std::fs::read(dir.path().join("client-ca.key")).unwrap();
    // A second CA would make every certificate signed by the first worthless.
    refused(&["ca", d], None, "exists");
    assert_eq!(std::fs::read(dir.path().join("client-ca.key")).unwrap(), ca);
    refused(&["client", d, "phone"], Some(PASSWORD), "exists");
    // NAME is a file name and a subject: no paths, no separators.
    for name in ["../phone", "a b", "cn=x/o=y", ".hidden", ""] {
        refused(&["client", d, name], Some(PASSWORD), "NAME must be");
    }
    // No password and no terminal to ask on; an empty one (iOS refuses such a bundle).
    refused(&["client", d, "tablet"], None, "P12_PASSWORD");
    refused(&["client", d, "tablet"], Some(""), "P12_PASSWORD");
    assert!(
        !dir.path().join("tablet.key").exists(),
        "a refused run left a key"
    );
}

/// `make-client-cert client DIR NAME` on a terminal (util-linux `script` gives it one), typing
/// `typed`; (success, what it printed).
fn make_client_cert_on_a_terminal(dir: &Path, name: &str, typed: &str) -> (bool, String) {
    use std::io::Write;
    let script = format!(
        "{} client {} {name}",
        deploy_dir().join("make-client-cert").display(),
        dir.display()
    );
    let mut child = command(tool("script", "apt-get install -y bsdutils"))
        .args(["-q", "-e", "-c", &script, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(typed.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), text(&out))
}

#[test]
fn make_client_cert_asks_for_the_password_twice_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let out = make_client_cert(&["ca", dir.path().to_str().unwrap()], None);
    assert!(out.status.success(), "ca: {}", text(&out));
    let (ok, said) = make_client_cert_on_a_terminal(dir.path(), "tablet", "typed-pw\ntyped-pw\n");
    assert!(ok, "{said}");
    assert!(said.contains("password for tablet.p12"), "{said}");
    let p12 = dir.path().join("tablet.p12");
    let (ok, info) = openssl_run(&[
        "pkcs12",
        "-info",
        "-noout",
        "-in",
        p12.to_str().unwrap(),
        "-passin",
        "pass:typed-pw",
    ]);
    assert!(
        ok,
        "the bundle does not open with the typed password: {info}"
    );
    let (ok, said) = make_client_cert_on_a_terminal(dir.path(), "laptop", "one-pw\nother-pw\n");
    assert!(!ok && said.contains("the passwords differ"), "{said}");
    assert!(
        !dir.path().join("laptop.key").exists(),
        "a refused run left a key"
    );
}

#[test]
fn license_is_the_mit_license_cargo_toml_declares() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let license = std::fs::read_to_string(root.join("LICENSE")).expect("LICENSE");
    assert!(
        license.starts_with("MIT License\n"),
        "LICENSE is not the MIT license"
    );
    assert!(license.contains("Copyright (c) 2026 the gatekeeper authors"));
    assert!(license.contains("THE SOFTWARE IS PROVIDED \"AS IS\""));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        manifest.lines().any(|l| l.trim() == "license = \"MIT\""),
        "Cargo.toml's license changed"
    );
}

/// actionlint checks the workflow's shape, not that the repository has what it packages.
#[test]
fn release_workflow_packages_files_that_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join(".github/workflows/release.yml"))
        .expect(".github/workflows/release.yml");
    let workflow = yaml_to_json(&text).expect("release.yml is YAML");
    let steps = |job: &str| {
        workflow["jobs"][job]["steps"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let build = steps("image")
        .into_iter()
        .find(|s| {
            s["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("docker/build-push-action@"))
        })
        .expect("the image job builds with docker/build-push-action");
    let dockerfile = build["with"]["file"]
        .as_str()
        .expect("build-push-action's file");
    assert!(
        root.join(dockerfile).is_file(),
        "{dockerfile} does not exist"
    );
    assert_eq!(build["with"]["platforms"], "linux/amd64,linux/arm64");
    let package = steps("binaries")
        .into_iter()
        .find(|s| s["name"] == "Package")
        .expect("a Package step");
    let copy = package["run"]
        .as_str()
        .unwrap()
        .lines()
        .find(|l| l.trim_start().starts_with("cp "))
        .expect("the Package step copies files");
    let files: Vec<&str> = copy
        .split_whitespace()
        .skip(1)
        .filter(|w| !w.starts_with('"'))
        .collect();
    assert!(files.contains(&"LICENSE"), "{copy}");
    for file in files {
        assert!(
            root.join(file).is_file(),
            "the release packages {file}, which does not exist"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The made certificate against Traefik with deploy/traefik/dynamic/mtls.yml
// ---------------------------------------------------------------------------------------------

/// curl `https://ha.example.com:PORT/` (resolved to 127.0.0.1) with `cert` (curl's `--cert`
/// arguments); (status, curl's complaint). Status 0: no HTTP answer (a refused handshake).
/// `--insecure`: the server certificate is Traefik's default one; the client's is under test.
fn curl(port: u16, cert: &[&str]) -> (u16, String) {
    let out = output(
        command(tool("curl", "apt-get install -y curl"))
            .args([
                "-q",
                "--silent",
                "--show-error",
                "--insecure",
                "--max-time",
                "10",
            ])
            .args(["--noproxy", "*", "--resolve"])
            .arg(format!("ha.example.com:{port}:127.0.0.1"))
            .args(["--output", "/dev/null", "--write-out", "%{http_code}"])
            .args(cert)
            .arg(format!("https://ha.example.com:{port}/")),
    );
    (
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

#[test]
fn traefik_with_mtls_yml_admits_the_made_certificate_and_refuses_others() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("certs");
    make_ca_and_client(&home, "phone");
    // Made by the same procedure, by someone else.
    let other = dir.path().join("other");
    make_ca_and_client(&other, "intruder");

    let ha = StandIn::start(Mode::Answer, |_| upstream::Reply {
        status: 200,
        content_type: "text/plain",
        body: "home assistant\n".into(),
        location: None,
    });
    let traefik = Traefik::new();
    let mtls = std::fs::read_to_string(deploy_dir().join("traefik/dynamic/mtls.yml"))
        .expect("read deploy/traefik/dynamic/mtls.yml");
    assert!(
        mtls.contains(CA_IN_TRAEFIK),
        "mtls.yml no longer reads {CA_IN_TRAEFIK}: update this test and make-client-cert's help"
    );
    let ca = home.join("client-ca.pem");
    traefik.write_dynamic(
        "mtls.yml",
        &mtls.replace(CA_IN_TRAEFIK, ca.to_str().unwrap()),
    );
    let options = yaml_to_json(&mtls).expect("mtls.yml is YAML");
    let option = options["tls"]["options"]
        .as_object()
        .and_then(|o| o.keys().next().cloned())
        .expect("mtls.yml defines a TLS option");
    traefik.write_dynamic(
        "ha.yml",
        &json!({"http": {
            "routers": {"ha": {
                "rule": "Host(`ha.example.com`)",
                "entryPoints": ["websecure"],
                "service": "ha",
                "tls": {"options": option},
            }},
            "services": {"ha": {"loadBalancer": {"servers": [{"url": ha.origin()}]}}},
        }})
        .to_string(),
    );
    let dynamic = traefik.dynamic();
    let traefik = traefik.start(json!({
        "entryPoints": {"websecure": entrypoint(json!({}))},
        "providers": {"file": {"directory": dynamic, "watch": true}},
    }));
    traefik.wait_router("ha@file");
    let port = traefik.entrypoint("websecure").port();

    // The bundle a phone imports, and the PEM pair, are both admitted.
    let p12 = format!("{}:{PASSWORD}", home.join("phone.p12").display());
    let (status, error) = curl(port, &["--cert-type", "P12", "--cert", &p12]);
    assert_eq!(status, 200, "with phone.p12: {error}");
    let (cert, key) = (home.join("phone.pem"), home.join("phone.key"));
    let pem = [
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ];
    let (status, error) = curl(port, &pem);
    assert_eq!(status, 200, "with phone.pem: {error}");

    // No certificate, or one from another CA: the handshake fails.
    let (status, error) = curl(port, &[]);
    assert_eq!(status, 0, "without a certificate: {error}");
    let p12 = format!("{}:{PASSWORD}", other.join("intruder.p12").display());
    let (status, error) = curl(port, &["--cert-type", "P12", "--cert", &p12]);
    assert_eq!(status, 0, "with another CA's certificate: {error}");
    assert_eq!(ha.hits().len(), 2, "Home Assistant saw {:?}", ha.lines());
    // Traefik took mtls.yml and the CA file without a warning or an error.
    traefik.assert_no_problems();
}
