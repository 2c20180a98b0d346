//! Artefacts: after the steps, the files `hive.toml` names are found in the checkout and held
//! open until the box has read them (`CellAgent.ReadArtifact`) and streamed them on to the
//! control plane.
//!
//! The checkout is the build's, so it is hostile. Directories are walked without following
//! symlinks; a matched path is opened with `openat2(RESOLVE_BENEATH)` from the checkout (a
//! symlink is followed only while it stays inside it). Only regular files of the build user
//! are taken (no devices, fifos or sockets; no hard link to another user's file), up to the
//! byte cap and [`MAX_FILES`]. Collection runs after the container's processes are gone, so a
//! file cannot change between being measured and being read.

use hive_proto::v1::ArtifactFile;
use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Most artefact files one build keeps.
pub const MAX_FILES: usize = 1000;
/// Most directory entries looked at while walking (bounds the time a huge tree takes).
const MAX_ENTRIES: usize = 200_000;
/// Deepest directory walked.
const MAX_DEPTH: usize = 64;

/// A collected artefact: its path and size, and the open file.
#[derive(Debug)]
pub struct Collected {
    pub path: String,
    pub size: u64,
    file: std::fs::File,
}

/// What a collection found: the files, and a line for each path left out and why.
#[derive(Debug, Default)]
pub struct Outcome {
    pub files: Vec<Collected>,
    pub notes: Vec<String>,
}

/// The artefacts of the cell's build, held open for `ReadArtifact`.
#[derive(Debug, Default)]
pub struct Held {
    files: Mutex<Vec<Collected>>,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Collected>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, files: Vec<Collected>) {
        *self.lock() = files;
    }

    pub fn list(&self) -> Vec<ArtifactFile> {
        self.lock()
            .iter()
            .map(|c| ArtifactFile {
                path: c.path.clone(),
                size: c.size,
            })
            .collect()
    }

    /// Up to `max` bytes of artefact `path` from `offset` (never past the size it was
    /// collected with); `None` for a path that was not collected.
    pub fn read(&self, path: &str, offset: u64, max: usize) -> Option<std::io::Result<Vec<u8>>> {
        let files = self.lock();
        let c = files.iter().find(|c| c.path == path)?;
        let want = c.size.saturating_sub(offset).min(max as u64) as usize;
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match c.file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e)),
            }
        }
        buf.truncate(got);
        Some(Ok(buf))
    }
}

/// Limits of one collection.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most bytes in all.
    pub cap_bytes: u64,
    /// The build user: only files it owns are taken.
    pub owner: u32,
}

/// Whether a pattern has glob characters.
fn is_glob(p: &str) -> bool {
    p.contains(['*', '?'])
}

/// `*` (any run of characters) and `?` (one character) within one path component.
fn segment_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// Whether `path` (components) matches `pat` (components; `**` = any number of them).
pub fn glob_match(pat: &[&str], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|i| glob_match(rest, &path[i..])),
        Some((p, rest)) => match path.split_first() {
            Some((first, tail)) => {
                segment_match(p.as_bytes(), first.as_bytes()) && glob_match(rest, tail)
            }
            None => false,
        },
    }
}

/// Whether something below directory `dir` could match `pat`.
fn may_match_below(pat: &[&str], dir: &[&str]) -> bool {
    match (pat.split_first(), dir.split_first()) {
        (Some((&"**", _)), _) => true,
        (_, None) => !pat.is_empty(),
        (None, Some(_)) => false,
        (Some((p, prest)), Some((d, drest))) => {
            segment_match(p.as_bytes(), d.as_bytes()) && may_match_below(prest, drest)
        }
    }
}

/// Finds and opens the artefacts `patterns` name in the checkout `dir`.
pub fn collect(dir: &OwnedFd, patterns: &[String], limits: &Limits) -> Outcome {
    let mut out = Outcome::default();
    let mut globs: Vec<Vec<String>> = Vec::new();
    let mut candidates = BTreeSet::new();
    for p in patterns {
        if is_glob(p) {
            globs.push(p.split('/').map(String::from).collect());
            continue;
        }
        // A plain path: the file itself, or everything under the directory it names.
        match crate::pipeline::open_beneath(dir, p)
            .ok()
            .and_then(|fd| nix::sys::stat::fstat(fd.as_raw_fd()).ok())
        {
            Some(st) if (st.st_mode & libc::S_IFMT) == libc::S_IFDIR => {
                let mut g: Vec<String> = p.split('/').map(String::from).collect();
                g.push("**".into());
                globs.push(g);
            }
            _ => {
                candidates.insert(p.clone());
            }
        }
    }
    if !globs.is_empty() {
        let globs: Vec<Vec<&str>> = globs
            .iter()
            .map(|g| g.iter().map(String::as_str).collect())
            .collect();
        let mut seen = 0usize;
        let mut walk = Walk {
            globs: &globs,
            seen: &mut seen,
            found: &mut candidates,
            truncated: false,
        };
        if let Ok(root) = nix::dir::Dir::openat(
            Some(dir.as_raw_fd()),
            ".",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            nix::sys::stat::Mode::empty(),
        ) {
            walk.dir(root, &mut Vec::new());
        }
        if walk.truncated {
            out.notes.push(format!(
                "the checkout has over {MAX_ENTRIES} entries (or is deeper than {MAX_DEPTH}); \
                 the rest was not searched"
            ));
        }
    }
    if candidates.is_empty() {
        out.notes
            .push(format!("nothing matched {}", patterns.join(", ")));
    }
    let mut total = 0u64;
    for path in candidates {
        if out.files.len() >= MAX_FILES {
            out.notes.push(format!(
                "{path} and the rest: more than {MAX_FILES} files; left out"
            ));
            break;
        }
        let fd = match crate::pipeline::open_beneath(dir, &path) {
            Ok(fd) => fd,
            Err(nix::errno::Errno::ENOENT) => {
                out.notes.push(format!("{path}: no such file; left out"));
                continue;
            }
            Err(nix::errno::Errno::EXDEV) | Err(nix::errno::Errno::ELOOP) => {
                out.notes.push(format!(
                    "{path}: a symlink leading out of the checkout; left out"
                ));
                continue;
            }
            Err(e) => {
                out.notes
                    .push(format!("{path}: cannot be opened ({e}); left out"));
                continue;
            }
        };
        let file = std::fs::File::from(fd);
        let meta = match file.metadata() {
            Ok(m) => m,
            Err(e) => {
                out.notes.push(format!("{path}: {e}; left out"));
                continue;
            }
        };
        if meta.is_dir() {
            out.notes.push(format!(
                "{path}: a symlink to a directory (not followed); name the files in it"
            ));
            continue;
        }
        if !meta.is_file() {
            out.notes.push(format!(
                "{path}: not a regular file (a device, fifo or socket); left out"
            ));
            continue;
        }
        if std::os::unix::fs::MetadataExt::uid(&meta) != limits.owner {
            out.notes.push(format!(
                "{path}: does not belong to the build user; left out"
            ));
            continue;
        }
        let size = meta.len();
        if total.saturating_add(size) > limits.cap_bytes {
            out.notes.push(format!(
                "{path}: {size} bytes would pass the artefact cap of {} bytes; left out",
                limits.cap_bytes
            ));
            continue;
        }
        total += size;
        out.files.push(Collected { path, size, file });
    }
    out
}

struct Walk<'a> {
    globs: &'a [Vec<&'a str>],
    seen: &'a mut usize,
    found: &'a mut BTreeSet<String>,
    truncated: bool,
}

impl Walk<'_> {
    fn dir(&mut self, mut d: nix::dir::Dir, at: &mut Vec<String>) {
        if at.len() > MAX_DEPTH {
            self.truncated = true;
            return;
        }
        let fd = d.as_raw_fd();
        let mut subdirs = Vec::new();
        for entry in d.iter().flatten() {
            *self.seen += 1;
            if *self.seen > MAX_ENTRIES {
                self.truncated = true;
                return;
            }
            let name = match entry.file_name().to_str() {
                Ok(".") | Ok("..") => continue,
                Ok(n) => n.to_string(),
                // Not UTF-8: no pattern names it.
                Err(_) => continue,
            };
            let st = match nix::sys::stat::fstatat(
                Some(fd),
                name.as_str(),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            ) {
                Ok(st) => st,
                Err(_) => continue,
            };
            at.push(name.clone());
            let parts: Vec<&str> = at.iter().map(String::as_str).collect();
            if (st.st_mode & libc::S_IFMT) == libc::S_IFDIR {
                if self.globs.iter().any(|g| may_match_below(g, &parts)) {
                    subdirs.push(name);
                }
            } else if self.globs.iter().any(|g| glob_match(g, &parts)) {
                self.found.insert(parts.join("/"));
            }
            at.pop();
        }
        for name in subdirs {
            // O_NOFOLLOW: a directory swapped for a symlink since the stat is not entered.
            if let Ok(sub) = nix::dir::Dir::openat(
                Some(fd),
                name.as_str(),
                nix::fcntl::OFlag::O_RDONLY
                    | nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_NOFOLLOW
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            ) {
                at.push(name);
                self.dir(sub, at);
                at.pop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn m(p: &str, s: &str) -> bool {
        glob_match(
            &p.split('/').collect::<Vec<_>>(),
            &s.split('/').collect::<Vec<_>>(),
        )
    }

    #[test]
    fn globs_match_by_component() {
        assert!(m("a/*.xml", "a/report.xml"));
        assert!(!m("a/*.xml", "a/b/report.xml"));
        assert!(m("a/**/*.xml", "a/report.xml"));
        assert!(m("a/**/*.xml", "a/b/c/report.xml"));
        assert!(m("**", "x/y"));
        assert!(m("r?port*", "report-1"));
        assert!(!m("r?port", "rport"));
        assert!(m("*a*b*c", "xxaxxbxxc"));
        assert!(!m("*a*b*c", "xxaxxbxx"));
        assert!(may_match_below(&["a", "*.xml"], &["a"]));
        assert!(!may_match_below(&["a", "*.xml"], &["b"]));
        assert!(!may_match_below(&["a", "*.xml"], &["a", "b"]));
        assert!(may_match_below(&["**", "x"], &["q", "r"]));
    }

    fn checkout() -> (tempfile::TempDir, OwnedFd, u32) {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join(crate::pipeline::CHECKOUT);
        std::fs::create_dir_all(work.join("out/sub")).unwrap();
        std::fs::write(work.join("out/app"), b"binary").unwrap();
        std::fs::write(work.join("out/sub/r.xml"), b"<r/>").unwrap();
        std::fs::write(work.join("out/sub/big.bin"), vec![7u8; 4000]).unwrap();
        std::fs::write(root.path().join("outside"), b"cell secret").unwrap();
        let dir = crate::pipeline::open_checkout(root.path()).unwrap();
        (root, dir, nix::unistd::getuid().as_raw())
    }

    fn paths(o: &Outcome) -> Vec<&str> {
        o.files.iter().map(|c| c.path.as_str()).collect()
    }

    #[test]
    fn collects_files_and_directories_and_globs() {
        let (_root, dir, me) = checkout();
        let lim = Limits {
            cap_bytes: 1 << 20,
            owner: me,
        };
        let o = collect(&dir, &["out/app".into()], &lim);
        assert_eq!(paths(&o), vec!["out/app"]);
        let o = collect(&dir, &["out".into()], &lim);
        assert_eq!(
            paths(&o),
            vec!["out/app", "out/sub/big.bin", "out/sub/r.xml"]
        );
        let o = collect(&dir, &["**/*.xml".into(), "nothing/here".into()], &lim);
        assert_eq!(paths(&o), vec!["out/sub/r.xml"]);
        assert!(
            o.notes[0].contains("nothing/here: no such file"),
            "{:?}",
            o.notes
        );
        let held = Held::default();
        held.set(o.files);
        assert_eq!(held.list()[0].size, 4);
        assert_eq!(held.read("out/sub/r.xml", 1, 2).unwrap().unwrap(), b"r/");
        assert_eq!(held.read("out/sub/r.xml", 9, 2).unwrap().unwrap(), b"");
        assert!(held.read("out/app", 0, 10).is_none());
    }

    #[test]
    fn hostile_checkouts_give_nothing_outside_it() {
        let (root, dir, me) = checkout();
        let work = root.path().join(crate::pipeline::CHECKOUT);
        let lim = Limits {
            cap_bytes: 1 << 20,
            owner: me,
        };
        // Symlinks out of the checkout, absolute or relative, named or globbed.
        symlink(root.path().join("outside"), work.join("out/abs")).unwrap();
        symlink("../../../outside", work.join("out/rel")).unwrap();
        symlink("/", work.join("out/rootdir")).unwrap();
        // A symlink inside the checkout is fine.
        symlink("app", work.join("out/inside")).unwrap();
        symlink("sub", work.join("out/subdir")).unwrap();
        // A fifo and a device-like node are not files.
        nix::unistd::mkfifo(&work.join("out/fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let o = collect(
            &dir,
            &["out/*".into(), "out/rootdir/etc/passwd".into()],
            &lim,
        );
        assert_eq!(paths(&o), vec!["out/app", "out/inside"], "{:?}", o.notes);
        let notes = o.notes.join("\n");
        for n in [
            "out/abs: a symlink leading out",
            "out/rel: a symlink leading out",
            "out/rootdir/etc/passwd: a symlink leading out",
            "out/fifo: not a regular file",
            "out/rootdir: a symlink leading out",
            "out/subdir: a symlink to a directory",
        ] {
            assert!(notes.contains(n), "{n:?} not in\n{notes}");
        }
        // Another user's file (a hard link to it, say) is left out.
        let o = collect(
            &dir,
            &["out/app".into()],
            &Limits {
                cap_bytes: 1 << 20,
                owner: me + 1,
            },
        );
        assert!(
            o.files.is_empty() && o.notes[0].contains("build user"),
            "{:?}",
            o.notes
        );
        // The cap: what does not fit is left out, what fits still comes.
        let o = collect(
            &dir,
            &["out/sub".into()],
            &Limits {
                cap_bytes: 100,
                owner: me,
            },
        );
        assert_eq!(paths(&o), vec!["out/sub/r.xml"]);
        assert!(
            o.notes[0].contains("artefact cap of 100 bytes"),
            "{:?}",
            o.notes
        );
    }
}
