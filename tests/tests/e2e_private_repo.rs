//! Issue 12, private repositories end to end with real parts: a real `sshd` (key auth only,
//! every login forced through `git-shell`) on a public test host in its own network namespace
//! serves a repository; the real control plane makes the project's deploy key
//! (`hivectl project deploy-key`), the real sandbox `hive-box` runs the build, and the real
//! `hive-cell` clones over ssh with the key and strict host-key checking. Checked: the build
//! succeeds and its steps find neither the key file nor the key in their environment; a key the
//! server does not know, no key, and a host key the project does not trust each fail the clone
//! with a line saying what to do; the key never reaches the log. Needs root, `sshd`
//! (openssh-server) and the Debian build image with `openssh-client`.
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hive_proto::v1::{BuildState, CreateProjectRequest, SubmitBuildRequest};
use hive_tests::cluster::{self, BoxDaemon, BoxOptions};
use hive_tests::controlplane::{ControlPlane, ControlPlaneOptions};

/// Separates tests that run at once: names, subnets and addresses carry it.
use hive_tests::run_id;

/// A public test host (its own netns on 198.18.0.0/15) running a real sshd on port 22 that
/// lets in only the keys of its authorized_keys file, each login forced into `git-shell`.
struct SshHost {
    name: String,
    addr: String,
    dir: tempfile::TempDir,
    sshd: Option<Child>,
    /// `ADDR ssh-ed25519 AAAA...`: the host key as known_hosts holds it.
    known_hosts_line: String,
    head: String,
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sshd_bin() -> Option<&'static str> {
    ["/usr/sbin/sshd", "/usr/bin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

impl SshHost {
    fn start(name: &str, addr: &str) -> SshHost {
        let sshd = sshd_bin().expect("sshd not found: apt-get install openssh-server");
        let dir = tempfile::Builder::new()
            .prefix("hive-ssh-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        // sshd refuses to start when its tree is writable by others; tempdir is 0700 root.
        std::fs::create_dir(d.join("work")).unwrap();
        std::fs::write(d.join("work/README"), "private repository\n").unwrap();
        let git = |args: &[&str], cwd: &Path| {
            sh(Command::new("git")
                .args(["-c", "user.name=Hive Test", "-c", "user.email=test@hive"])
                .args(args)
                .current_dir(cwd))
        };
        git(&["init", "-q", "-b", "main"], &d.join("work"));
        git(&["add", "."], &d.join("work"));
        git(&["commit", "-q", "-m", "private"], &d.join("work"));
        let head = git(&["rev-parse", "HEAD"], &d.join("work"));
        git(&["clone", "-q", "--bare", "work", "private.git"], d);
        sh(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join("host_key")));
        let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        let mut parts = host_pub.split_whitespace();
        let known_hosts_line =
            format!("{addr} {} {}", parts.next().unwrap(), parts.next().unwrap());
        std::fs::write(d.join("authorized_keys"), "").unwrap();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "ListenAddress {addr}:22\nHostKey {hk}\nPidFile {pid}\nAuthorizedKeysFile {ak}\n\
                 PubkeyAuthentication yes\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
                 PermitRootLogin prohibit-password\nAllowUsers root\n\
                 ForceCommand git-shell -c \"$SSH_ORIGINAL_COMMAND\"\n\
                 AllowTcpForwarding no\nX11Forwarding no\nPermitTTY no\nLogLevel VERBOSE\n",
                hk = d.join("host_key").display(),
                pid = d.join("sshd.pid").display(),
                ak = d.join("authorized_keys").display(),
            ),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let script =
            hive_tests::controlplane::workspace_root().join("deploy/test-hosts/test-host.sh");
        sh(Command::new(&script).args(["up", "--name", name, "--addr", addr]));
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let child = Command::new(&script)
            .args(["exec", "--name", name, "--", sshd, "-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        let host = SshHost {
            name: name.into(),
            addr: addr.into(),
            dir,
            sshd: Some(child),
            known_hosts_line,
            head,
        };
        let netns = format!("hive-th-{name}");
        let sa: std::net::SocketAddr = format!("{addr}:22").parse().unwrap();
        let t0 = std::time::Instant::now();
        while cluster::connect_in_netns(&netns, sa, Duration::from_millis(200)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "sshd did not listen on {sa}: {}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }

    fn url(&self) -> String {
        format!(
            "ssh://root@{}{}",
            self.addr,
            self.dir.path().join("private.git").display()
        )
    }

    fn authorize(&self, public_key_line: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("authorized_keys"))
            .unwrap();
        writeln!(f, "{public_key_line}").unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("sshd.pid")) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let script =
            hive_tests::controlplane::workspace_root().join("deploy/test-hosts/test-host.sh");
        let _ = Command::new(script)
            .args(["down", "--name", &self.name])
            .output();
    }
}

fn hivectl(cp: &ControlPlane, args: &[&str]) -> String {
    let out = cp.hivectl(args).expect("run hivectl");
    assert!(
        out.status.success(),
        "hivectl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

async fn build(cp: &ControlPlane, project: &str, rev: &str) -> (hive_proto::v1::Build, String) {
    let b = cp
        .api()
        .await
        .submit_build(SubmitBuildRequest {
            project: project.into(),
            revision: rev.into(),
            ..Default::default()
        })
        .await
        .expect("SubmitBuild")
        .into_inner();
    let b = cluster::wait_build(&cp.grpc_url(), &b.id, Duration::from_secs(120)).await;
    let (log, _) = cluster::build_log(&cp.grpc_url(), &b.id).await;
    (b, log)
}

async fn project(cp: &ControlPlane, name: &str, url: &str, steps: &[&str]) {
    cp.api()
        .await
        .create_project(CreateProjectRequest {
            name: name.into(),
            repo_url: url.into(),
            size_class: "small".into(),
            steps: steps.iter().map(|s| s.to_string()).collect(),
            timeout_secs: 120,
            ..Default::default()
        })
        .await
        .expect("CreateProject");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_builds_over_ssh_with_the_deploy_key_and_only_with_it() {
    if sshd_bin().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "sshd missing under CI: deploy/install-deps.sh installs openssh-server"
        );
        eprintln!("SKIPPED: no sshd (apt-get install openssh-server)");
        return;
    }
    let image = cluster::build_image();
    assert!(
        image.join("usr/bin/ssh").exists(),
        "build image {} has no ssh client: re-run deploy/images/build-images.sh",
        image.display()
    );
    let r = run_id();
    let addr = format!("198.18.{}.30", 1 + r);
    let host = tokio::task::spawn_blocking(move || SshHost::start(&format!("pr{r}"), &addr))
        .await
        .unwrap();
    let cp = tokio::task::spawn_blocking(|| {
        ControlPlane::start(ControlPlaneOptions {
            lease_secs: 10,
            heartbeat_interval_ms: 500,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("control plane");
    let url = cp.grpc_url();
    let boxd = tokio::task::spawn_blocking(move || {
        BoxDaemon::start(
            &url,
            BoxOptions {
                tag: format!("pr{r}"),
                subnet_octet: (240 + r) as u8,
                pool: "small=1".into(),
                lease_secs: 10,
                block: vec![],
                extra: vec![],
            },
        )
    })
    .await
    .unwrap();
    assert!(
        boxd.wait_pool("small", 1, Duration::from_secs(60)).await,
        "pool never warm: {}",
        boxd.log()
    );
    let kh_file = host.dir.path().join("known_hosts.for-hive");
    std::fs::write(
        &kh_file,
        format!("# the test host\n{}\n", host.known_hosts_line),
    )
    .unwrap();
    let kh = kh_file.to_str().unwrap();

    // 1. The deploy key, made by the control plane, added to the server: the build clones.
    project(
        &cp,
        "priv",
        &host.url(),
        &[
            "cat README",
            "test ! -e /run/hive-clone && echo no-key-file-left",
            // (The key's marker is spelled in pieces so this step's own line is no match.)
            "k=OPENSSH; if env | grep -q \"BEGIN $k\\|GIT_SSH\"; then echo KEY-IN-ENV; exit 1; fi; echo env-clean",
        ],
    )
    .await;
    let out = hivectl(&cp, &["project", "deploy-key", "priv", "--known-hosts", kh]);
    let public = out.lines().next().unwrap().to_string();
    assert!(public.starts_with("ssh-ed25519 "), "{out}");
    assert!(out.contains("the project's own (1 lines)"), "{out}");
    // Asking again shows the same key; the private half is never printed.
    let again = hivectl(&cp, &["project", "deploy-key", "priv"]);
    assert_eq!(again.lines().next().unwrap(), public);
    assert!(!out.contains("PRIVATE") && !again.contains("PRIVATE"));
    host.authorize(&public);
    let (b, log) = build(&cp, "priv", &host.head).await;
    let ctx = || format!("\nlog:\n{log}\nsshd:\n{}\nbox:\n{}", host.log(), boxd.log());
    assert_eq!(b.state(), BuildState::Succeeded, "{b:?}{}", ctx());
    for needle in [
        &format!("checked out {}", host.head)[..],
        "the project's deploy key, 1 trusted host key",
        "private repository",
        "no-key-file-left",
        "env-clean",
    ] {
        assert!(log.contains(needle), "{needle:?} missing{}", ctx());
    }
    assert!(!log.contains("BEGIN OPENSSH"), "{}", ctx());

    // 2. A rotated key the server does not know: the clone fails and says what to do.
    let rotated = hivectl(&cp, &["project", "deploy-key", "priv", "--rotate"]);
    assert_ne!(rotated.lines().next().unwrap(), public);
    let (b, log) = build(&cp, "priv", &host.head).await;
    assert_eq!(b.state(), BuildState::Failed, "{b:?}\n{log}");
    assert!(
        log.contains("refused the project's deploy key")
            && log.contains("hivectl project deploy-key"),
        "no clear line for a wrong key:\n{log}"
    );

    // 3. No key at all.
    project(&cp, "nokey", &host.url(), &["true"]).await;
    let kh_only = hive_proto::v1::CloneAccessRequest {
        project: "nokey".into(),
        set_known_hosts: true,
        known_hosts: host.known_hosts_line.clone(),
        ..Default::default()
    };
    cp.api()
        .await
        .clone_access(kh_only)
        .await
        .expect("CloneAccess");
    let (b, log) = build(&cp, "nokey", &host.head).await;
    assert_eq!(b.state(), BuildState::Failed, "{b:?}\n{log}");
    assert!(
        log.contains("no deploy key"),
        "no clear line for a missing key:\n{log}"
    );

    // 4. The right key but a host key the project does not trust (only the forges' keys):
    // strict checking stops the clone before any authentication.
    project(&cp, "unknownhost", &host.url(), &["true"]).await;
    let out = hivectl(&cp, &["project", "deploy-key", "unknownhost"]);
    assert!(
        out.contains("github.com, gitlab.com, codeberg.org"),
        "{out}"
    );
    host.authorize(out.lines().next().unwrap());
    let (b, log) = build(&cp, "unknownhost", &host.head).await;
    assert_eq!(b.state(), BuildState::Failed, "{b:?}\n{log}");
    assert!(
        log.contains("Host key verification failed") && log.contains("--known-hosts"),
        "no clear line for an unknown host key:\n{log}"
    );

    // 5. Bad input at the door: a known_hosts file that is not one.
    let junk = host.dir.path().join("junk");
    std::fs::write(&junk, "this is not a host key\n").unwrap();
    let out = cp
        .hivectl(&[
            "project",
            "deploy-key",
            "priv",
            "--known-hosts",
            junk.to_str().unwrap(),
        ])
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("known_hosts line 1") && err.contains("ssh-keyscan"),
        "{err}"
    );

    // The secrets list shows the deploy key by its reserved name, never a value.
    let list = hivectl(&cp, &["secret", "list", "priv"]);
    assert!(list.contains("hive.deploy_key"), "{list}");
    drop(boxd);
}

/// A real `git http-backend` behind a small HTTPS server with basic auth (Python's standard
/// library; a self-signed certificate) on a public test host.
struct HttpsHost {
    name: String,
    addr: String,
    dir: tempfile::TempDir,
    server: Option<Child>,
    head: String,
}

const HTTPS_SERVER: &str = r#"
import base64, http.server, os, ssl, subprocess, sys
root, addr, cert, key, user, token = sys.argv[1:]
want = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()
class Git(http.server.BaseHTTPRequestHandler):
    def do_GET(self): self.git()
    def do_POST(self): self.git()
    def git(self):
        if self.headers.get("Authorization") != want:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        env = {"GIT_PROJECT_ROOT": root, "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
               "QUERY_STRING": query, "REQUEST_METHOD": self.command, "REMOTE_USER": user,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""), "PATH": os.environ["PATH"],
               "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
               "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", "")}
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        sep = b"\r\n\r\n" if b"\r\n\r\n" in out else b"\n\n"
        head, _, rest = out.partition(sep)
        status, headers = 200, []
        for line in head.decode().splitlines():
            k, _, v = line.partition(":")
            if k.lower() == "status":
                status = int(v.split()[0])
            elif k:
                headers.append((k, v.strip()))
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)
srv = http.server.ThreadingHTTPServer((addr, 443), Git)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

impl HttpsHost {
    fn start(name: &str, addr: &str, user: &str, token: &str) -> HttpsHost {
        let dir = tempfile::Builder::new()
            .prefix("hive-https-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("work")).unwrap();
        std::fs::write(d.join("work/README"), "private over https\n").unwrap();
        let git = |args: &[&str], cwd: &Path| {
            sh(Command::new("git")
                .args(["-c", "user.name=Hive Test", "-c", "user.email=test@hive"])
                .args(args)
                .current_dir(cwd))
        };
        git(&["init", "-q", "-b", "main"], &d.join("work"));
        git(&["add", "."], &d.join("work"));
        git(&["commit", "-q", "-m", "https"], &d.join("work"));
        let head = git(&["rev-parse", "HEAD"], &d.join("work"));
        git(&["clone", "-q", "--bare", "work", "private.git"], d);
        sh(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=hive-test"])
            .args(["-addext", &format!("subjectAltName=IP:{addr}")])
            .arg("-keyout")
            .arg(d.join("key.pem"))
            .arg("-out")
            .arg(d.join("cert.pem")));
        std::fs::write(d.join("server.py"), HTTPS_SERVER).unwrap();
        let script =
            hive_tests::controlplane::workspace_root().join("deploy/test-hosts/test-host.sh");
        sh(Command::new(&script).args(["up", "--name", name, "--addr", addr]));
        let log = std::fs::File::create(d.join("server.log")).unwrap();
        let child = Command::new(&script)
            .args(["exec", "--name", name, "--", "python3"])
            .arg(d.join("server.py"))
            .args([d.to_str().unwrap(), addr])
            .arg(d.join("cert.pem"))
            .arg(d.join("key.pem"))
            .args([user, token])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the https server");
        let mut host = HttpsHost {
            name: name.into(),
            addr: addr.into(),
            dir,
            server: Some(child),
            head,
        };
        let sa: std::net::SocketAddr = format!("{addr}:443").parse().unwrap();
        let t0 = std::time::Instant::now();
        while cluster::connect_in_netns(&format!("hive-th-{name}"), sa, Duration::from_millis(200))
            .is_err()
        {
            if let Some(Ok(Some(status))) = host.server.as_mut().map(Child::try_wait) {
                panic!("https server exited ({status}): {}", host.log());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "https server did not listen on {sa}: {}",
                host.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        host
    }

    fn url(&self) -> String {
        format!("https://{}/private.git", self.addr)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for HttpsHost {
    fn drop(&mut self) {
        let script =
            hive_tests::controlplane::workspace_root().join("deploy/test-hosts/test-host.sh");
        if let Some(mut c) = self.server.take() {
            // `test-host.sh exec` execs into the namespace: the child is the server itself.
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new(script)
            .args(["down", "--name", &self.name])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_repository_builds_over_https_with_the_token_sent_as_a_header() {
    let image = cluster::build_image();
    assert!(image.join("usr/bin/git").exists());
    let r = run_id();
    let addr = format!("198.18.{}.31", 1 + r);
    const TOKEN: &str = "glpat-hive-e2e-0123456789";
    let host = tokio::task::spawn_blocking(move || {
        HttpsHost::start(&format!("ph{r}"), &addr, "deploy-bot", TOKEN)
    })
    .await
    .unwrap();
    let cp = tokio::task::spawn_blocking(|| {
        ControlPlane::start(ControlPlaneOptions {
            lease_secs: 10,
            heartbeat_interval_ms: 500,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .expect("control plane");
    let url = cp.grpc_url();
    let boxd = tokio::task::spawn_blocking(move || {
        BoxDaemon::start(
            &url,
            BoxOptions {
                tag: format!("ph{r}"),
                subnet_octet: (228 + r) as u8,
                pool: "small=1".into(),
                lease_secs: 10,
                block: vec![],
                extra: vec![],
            },
        )
    })
    .await
    .unwrap();
    assert!(
        boxd.wait_pool("small", 1, Duration::from_secs(60)).await,
        "pool never warm: {}",
        boxd.log()
    );
    // The test server's certificate is self-signed; the project's env tells git so (what is
    // tested here is the token, not the certificate).
    cp.api()
        .await
        .create_project(CreateProjectRequest {
            name: "https".into(),
            repo_url: host.url(),
            size_class: "small".into(),
            steps: vec![
                "cat README".into(),
                // The token's value, spelled in pieces, is nowhere in the steps' environment.
                "t=glpat-hive; if env | grep -q \"$t-e2e\\|extraHeader\\|GIT_CONFIG\"; then echo TOKEN-IN-ENV; exit 1; fi; echo env-clean".into(),
                "cat /work/src/.git/config".into(),
            ],
            env: [("GIT_SSL_NO_VERIFY".to_string(), "1".to_string())].into(),
            timeout_secs: 120,
            ..Default::default()
        })
        .await
        .expect("CreateProject");

    // No token: the server asks for credentials; the clone fails and says what to do.
    let (b, log) = build(&cp, "https", &host.head).await;
    assert_eq!(b.state(), BuildState::Failed, "{b:?}\n{log}");
    assert!(
        log.contains("has no https token") && log.contains("hivectl project https-token"),
        "no clear line for a missing token:\n{log}"
    );

    // A wrong token.
    let set = |token: &'static str| {
        let mut cmd = Command::new(hive_tests::controlplane::hivectl_bin());
        cmd.args(["--addr", &cp.grpc_url(), "project", "https-token", "https"])
            .args(["--user", "deploy-bot"])
            .env("HIVE_TOKEN", cp.admin_token().unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{token}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = set("not-the-token");
    assert!(out.contains("set (user deploy-bot)"), "{out}");
    let list = hivectl(&cp, &["secret", "list", "https"]);
    assert!(list.contains("hive.https_token"), "{list}");
    let (b, log) = build(&cp, "https", &host.head).await;
    assert_eq!(b.state(), BuildState::Failed, "{b:?}\n{log}");
    assert!(
        log.contains("refused the project's https token"),
        "no clear line for a wrong token:\n{log}\nserver:\n{}",
        host.log()
    );
    assert!(
        !log.contains("not-the-token"),
        "the token reached the log:\n{log}"
    );

    // The right one: the build clones; the token is in no log, URL, .git/config or step env.
    let out = set(TOKEN);
    assert!(out.contains("user deploy-bot"), "{out}");
    let (b, log) = build(&cp, "https", &host.head).await;
    assert_eq!(
        b.state(),
        BuildState::Succeeded,
        "{b:?}\n{log}\nserver:\n{}\nbox:\n{}",
        host.log(),
        boxd.log()
    );
    for needle in [
        &format!("checked out {}", host.head)[..],
        "hive: https: the project's token, sent as a header",
        "private over https",
        "env-clean",
        &format!("url = {}", host.url())[..],
    ] {
        assert!(log.contains(needle), "{needle:?} missing:\n{log}");
    }
    assert!(!log.contains(TOKEN), "the token reached the log:\n{log}");
    let project = cp
        .api()
        .await
        .get_project(hive_proto::v1::GetProjectRequest {
            project: "https".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{project:?}").contains(TOKEN));
    drop(boxd);
}
