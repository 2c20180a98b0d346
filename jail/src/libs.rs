//! The shared libraries a dynamically linked program loads, so its jail can bind exactly those.
//!
//! The VMM is the box daemon's own binary (`hive-box` re-executes itself), and its jail's root is
//! empty but for what the microvm backend binds: no `/etc/ld.so.cache`, no `/lib`. This reads the
//! binary's ELF program interpreter (`PT_INTERP`) and `DT_NEEDED` entries and, transitively, those
//! of each library, resolving each name as the dynamic loader does: `DT_RPATH` (only when there
//! is no `DT_RUNPATH`), `DT_RUNPATH` (both with `$ORIGIN`), the directories of `/etc/ld.so.conf`
//! and its includes (what `ldconfig` puts in the cache), then the default directories. A name a
//! loaded object already carries as its `DT_SONAME` (the interpreter's, for libc's need of it) is
//! not searched again. It replaces running `ldd`, which needs a tool in the box's image and runs
//! the loader on the binary; the result is the same list (`agrees_with_ldd` checks it).
//! `LD_LIBRARY_PATH` is ignored: the jail's environment never carries it.
//!
//! Only 64-bit little-endian ELF (the box runs on x86-64); a candidate library of another class
//! or machine is skipped, as the loader skips it. A binary without `PT_INTERP` and `DT_NEEDED`
//! (static) needs nothing.
use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Where the loader looks when nothing else names a directory (x86-64 glibc, Debian multiarch
/// first).
pub const DEFAULT_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// The loader's configuration file: its directories come before [`DEFAULT_DIRS`].
pub const LD_SO_CONF: &str = "/etc/ld.so.conf";

/// Bounds on what is read from a file: a corrupt or hostile ELF must not make us allocate much.
const MAX_PHNUM: u64 = 4096;
const MAX_DYNAMIC: u64 = 1 << 20;
const MAX_STRTAB: u64 = 16 << 20;
/// Most objects followed (a loop of `DT_NEEDED` cannot run away).
const MAX_OBJECTS: usize = 512;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: i64 = 0;
const DT_NEEDED: i64 = 1;
const DT_STRTAB: i64 = 5;
const DT_STRSZ: i64 = 10;
const DT_SONAME: i64 = 14;
const DT_RPATH: i64 = 15;
const DT_RUNPATH: i64 = 29;

/// Why the libraries of a program could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum LibsError {
    /// The file could not be opened or read.
    #[error("read {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an ELF file this reader understands.
    #[error("{path}: {why}")]
    Elf {
        /// File.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A needed library is in none of the directories searched.
    #[error("{object} needs {name}: not found in {searched}")]
    NotFound {
        /// The object that needs it.
        object: PathBuf,
        /// The `DT_NEEDED` name.
        name: String,
        /// The directories searched, comma-separated.
        searched: String,
    },
}

/// What the loader reads from one ELF file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dynamic {
    /// `e_machine`: libraries must match the program's.
    pub machine: u16,
    /// `PT_INTERP`, the program interpreter (the dynamic loader).
    pub interp: Option<PathBuf>,
    /// `DT_NEEDED` names, in order.
    pub needed: Vec<String>,
    /// `DT_SONAME`.
    pub soname: Option<String>,
    /// `DT_RPATH` entries, unexpanded.
    pub rpath: Vec<String>,
    /// `DT_RUNPATH` entries, unexpanded.
    pub runpath: Vec<String>,
}

/// Absolute paths of the shared libraries `program` loads, the interpreter last (as `ldd` lists
/// them). Empty for a static program.
pub fn shared_libs(program: &Path) -> Result<Vec<PathBuf>, LibsError> {
    shared_libs_in(program, &system_dirs(Path::new(LD_SO_CONF)))
}

/// As [`shared_libs`], with `system` as the directories searched after each object's own paths.
pub fn shared_libs_in(program: &Path, system: &[PathBuf]) -> Result<Vec<PathBuf>, LibsError> {
    let main = read(program)?;
    let mut libs: Vec<PathBuf> = Vec::new();
    // Names that are satisfied: the sonames and file names of everything loaded so far.
    let mut loaded: BTreeSet<String> = BTreeSet::new();
    if let Some(interp) = &main.interp {
        let d = read(interp)?;
        loaded.extend(d.soname);
        loaded.extend(file_name(interp));
    }
    let mut queue: VecDeque<(PathBuf, Dynamic)> = VecDeque::from([(program.to_path_buf(), main)]);
    let interp = queue[0].1.interp.clone();
    while let Some((object, dynamic)) = queue.pop_front() {
        let origin = object.parent().unwrap_or(Path::new("/")).to_path_buf();
        let mut dirs: Vec<PathBuf> = Vec::new();
        if dynamic.runpath.is_empty() {
            dirs.extend(expand(&dynamic.rpath, &origin));
        }
        dirs.extend(expand(&dynamic.runpath, &origin));
        dirs.extend(system.iter().cloned());
        for name in &dynamic.needed {
            if loaded.contains(name) {
                continue;
            }
            let (path, lib) =
                find(name, &dirs, dynamic.machine).ok_or_else(|| LibsError::NotFound {
                    object: object.clone(),
                    name: name.clone(),
                    searched: dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            loaded.insert(name.clone());
            loaded.extend(lib.soname.clone());
            loaded.extend(file_name(&path));
            libs.push(path.clone());
            if libs.len() > MAX_OBJECTS {
                return Err(LibsError::Elf {
                    path: program.to_path_buf(),
                    why: "needs too many libraries",
                });
            }
            queue.push_back((path, lib));
        }
    }
    libs.extend(interp);
    Ok(libs)
}

fn file_name(p: &Path) -> Option<String> {
    p.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// `$ORIGIN` (and `${ORIGIN}`) replaced by the object's directory; empty entries mean the
/// current directory to the loader, which a jail does not have: they are dropped.
fn expand(entries: &[String], origin: &Path) -> Vec<PathBuf> {
    let o = origin.to_string_lossy();
    entries
        .iter()
        .filter(|e| !e.is_empty())
        .map(|e| PathBuf::from(e.replace("${ORIGIN}", &o).replace("$ORIGIN", &o)))
        .collect()
}

/// The first file called `name` in `dirs` that is an ELF of `machine` (a name with a slash is
/// a path and is not searched).
fn find(name: &str, dirs: &[PathBuf], machine: u16) -> Option<(PathBuf, Dynamic)> {
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![PathBuf::from(name)]
    } else {
        dirs.iter().map(|d| d.join(name)).collect()
    };
    candidates.into_iter().find_map(|p| match read(&p) {
        Ok(d) if d.machine == machine => Some((p, d)),
        _ => None,
    })
}

/// The directories of `conf` (following `include` lines, with `*` globs in the file name), then
/// [`DEFAULT_DIRS`]; each once, in that order.
pub fn system_dirs(conf: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    read_conf(conf, &mut dirs, 0);
    for d in DEFAULT_DIRS {
        dirs.push(PathBuf::from(d));
    }
    let mut seen = BTreeSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

fn read_conf(conf: &Path, dirs: &mut Vec<PathBuf>, depth: u32) {
    if depth > 8 {
        return;
    }
    let Ok(text) = std::fs::read_to_string(conf) else {
        return;
    };
    let base = conf.parent().unwrap_or(Path::new("/"));
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(pattern) = line.strip_prefix("include") {
            for p in pattern.split_whitespace() {
                let p = base.join(p);
                for file in glob(&p) {
                    read_conf(&file, dirs, depth + 1);
                }
            }
        } else if line.starts_with('/') {
            // "dir" or the old "dir=TYPE" form.
            let dir = line.split('=').next().unwrap_or(line).trim();
            dirs.push(PathBuf::from(dir));
        }
    }
}

/// Files matching `pattern`, where only the last component may hold `*`s; sorted.
fn glob(pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return Vec::new();
    };
    let name = name.to_string_lossy();
    if !name.contains('*') {
        return vec![pattern.to_path_buf()];
    }
    let parts: Vec<&str> = name.split('*').collect();
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .map(|n| wildcard(&parts, &n.to_string_lossy()))
                .unwrap_or(false)
        })
        .collect();
    out.sort();
    out
}

/// Whether `s` matches the `*`-separated `parts`.
fn wildcard(parts: &[&str], s: &str) -> bool {
    let (first, rest) = match parts.split_first() {
        Some(x) => x,
        None => return s.is_empty(),
    };
    let Some(mut left) = s.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return left.is_empty();
    };
    for m in middle {
        match left.find(m) {
            Some(i) => left = &left[i + m.len()..],
            None => return false,
        }
    }
    left.len() >= last.len() && left.ends_with(last)
}

/// Reads the dynamic-linking facts of one ELF file.
pub fn read(path: &Path) -> Result<Dynamic, LibsError> {
    let file = File::open(path).map_err(|source| LibsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let elf = Elf { file, path };
    elf.dynamic()
}

/// One open ELF file, read piecewise (the VMM binary with debug info is large).
struct Elf<'a> {
    file: File,
    path: &'a Path,
}

/// A program header, the fields used here.
#[derive(Debug, Clone, Copy)]
struct Segment {
    kind: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

impl Elf<'_> {
    fn bad(&self, why: &'static str) -> LibsError {
        LibsError::Elf {
            path: self.path.to_path_buf(),
            why,
        }
    }

    fn bytes(&self, offset: u64, len: u64) -> Result<Vec<u8>, LibsError> {
        let len = usize::try_from(len).map_err(|_| self.bad("segment too large"))?;
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::UnexpectedEof => self.bad("truncated"),
                _ => LibsError::Read {
                    path: self.path.to_path_buf(),
                    source,
                },
            })?;
        Ok(buf)
    }

    fn dynamic(&self) -> Result<Dynamic, LibsError> {
        let head = self.bytes(0, 64).map_err(|_| self.bad("not an ELF file"))?;
        if head[0..4] != *b"\x7fELF" {
            return Err(self.bad("not an ELF file"));
        }
        if head[4] != 2 || head[5] != 1 {
            return Err(self.bad("not a 64-bit little-endian ELF file"));
        }
        let machine = u16_at(&head, 18);
        let phoff = u64_at(&head, 32);
        let phentsize = u64::from(u16_at(&head, 54));
        let phnum = u64::from(u16_at(&head, 56));
        if phnum > MAX_PHNUM || (phnum > 0 && phentsize < 56) {
            return Err(self.bad("bad program header table"));
        }
        let table = self.bytes(phoff, phentsize * phnum)?;
        let segments: Vec<Segment> = table
            .chunks_exact(phentsize as usize)
            .map(|p| Segment {
                kind: u32_at(p, 0),
                offset: u64_at(p, 8),
                vaddr: u64_at(p, 16),
                filesz: u64_at(p, 32),
            })
            .collect();
        let mut out = Dynamic {
            machine,
            ..Default::default()
        };
        if let Some(s) = segments.iter().find(|s| s.kind == PT_INTERP) {
            if s.filesz == 0 || s.filesz > 4096 {
                return Err(self.bad("bad PT_INTERP"));
            }
            let raw = self.bytes(s.offset, s.filesz)?;
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            let interp = String::from_utf8_lossy(&raw[..end]).into_owned();
            if !interp.starts_with('/') {
                return Err(self.bad("PT_INTERP is not an absolute path"));
            }
            out.interp = Some(PathBuf::from(interp));
        }
        let Some(dynseg) = segments.iter().find(|s| s.kind == PT_DYNAMIC) else {
            return Ok(out);
        };
        if dynseg.filesz > MAX_DYNAMIC {
            return Err(self.bad("PT_DYNAMIC too large"));
        }
        let raw = self.bytes(dynseg.offset, dynseg.filesz)?;
        let mut entries = Vec::new();
        for e in raw.chunks_exact(16) {
            let tag = u64_at(e, 0) as i64;
            if tag == DT_NULL {
                break;
            }
            entries.push((tag, u64_at(e, 8)));
        }
        let value = |tag| entries.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v);
        let (Some(strtab), Some(strsz)) = (value(DT_STRTAB), value(DT_STRSZ)) else {
            if entries.iter().any(|(t, _)| *t == DT_NEEDED) {
                return Err(self.bad("DT_NEEDED without a string table"));
            }
            return Ok(out);
        };
        if strsz > MAX_STRTAB {
            return Err(self.bad("string table too large"));
        }
        // DT_STRTAB is an address: the PT_LOAD segment holding it says where it is in the file.
        let load = segments
            .iter()
            .find(|s| s.kind == PT_LOAD && strtab >= s.vaddr && strtab - s.vaddr < s.filesz)
            .ok_or_else(|| self.bad("string table outside every PT_LOAD segment"))?;
        let strings = self.bytes(load.offset + (strtab - load.vaddr), strsz)?;
        let string = |off: u64| -> Result<String, LibsError> {
            let start = usize::try_from(off)
                .ok()
                .filter(|&o| o < strings.len())
                .ok_or_else(|| self.bad("string offset outside the string table"))?;
            let end = strings[start..]
                .iter()
                .position(|&b| b == 0)
                .map(|n| start + n)
                .ok_or_else(|| self.bad("unterminated string"))?;
            Ok(String::from_utf8_lossy(&strings[start..end]).into_owned())
        };
        let split = |s: String| -> Vec<String> { s.split(':').map(str::to_string).collect() };
        for (tag, val) in &entries {
            match *tag {
                DT_NEEDED => out.needed.push(string(*val)?),
                DT_SONAME => out.soname = Some(string(*val)?),
                DT_RPATH => out.rpath.extend(split(string(*val)?)),
                DT_RUNPATH => out.runpath.extend(split(string(*val)?)),
                _ => {}
            }
        }
        Ok(out)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 file: one PT_LOAD over the whole file (vaddr = offset), an optional
    /// PT_INTERP and a PT_DYNAMIC with the given entries (string-valued ones in a string table).
    fn elf(interp: Option<&str>, dynamic: &[(i64, &str)], soname: Option<&str>) -> Vec<u8> {
        let phnum: u64 = 3;
        let mut strtab = vec![0u8];
        let mut entries: Vec<(i64, u64)> = Vec::new();
        let mut add = |tag: i64, s: &str, strtab: &mut Vec<u8>| {
            entries.push((tag, strtab.len() as u64));
            strtab.extend_from_slice(s.as_bytes());
            strtab.push(0);
        };
        for (tag, s) in dynamic {
            add(*tag, s, &mut strtab);
        }
        if let Some(s) = soname {
            add(DT_SONAME, s, &mut strtab);
        }
        let interp_bytes: Vec<u8> = interp
            .map(|i| {
                let mut v = i.as_bytes().to_vec();
                v.push(0);
                v
            })
            .unwrap_or_default();
        let interp_off = 64 + 56 * phnum;
        let str_off = interp_off + interp_bytes.len() as u64;
        let dyn_off = str_off + strtab.len() as u64;
        entries.push((DT_STRTAB, str_off));
        entries.push((DT_STRSZ, strtab.len() as u64));
        entries.push((DT_NULL, 0));
        let dyn_len = 16 * entries.len() as u64;
        let total = dyn_off + dyn_len;

        let mut f = vec![0u8; 64];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        let mut ph = |kind: u32, off: u64, len: u64| {
            let mut p = vec![0u8; 56];
            p[0..4].copy_from_slice(&kind.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[16..24].copy_from_slice(&off.to_le_bytes());
            p[32..40].copy_from_slice(&len.to_le_bytes());
            p[40..48].copy_from_slice(&len.to_le_bytes());
            f.extend_from_slice(&p);
        };
        ph(PT_LOAD, 0, total);
        // No interpreter: an unused slot (PT_NULL).
        ph(
            if interp.is_some() { PT_INTERP } else { 0 },
            interp_off,
            interp_bytes.len() as u64,
        );
        ph(PT_DYNAMIC, dyn_off, dyn_len);
        f.extend_from_slice(&interp_bytes);
        f.extend_from_slice(&strtab);
        for (tag, val) in entries {
            f.extend_from_slice(&tag.to_le_bytes());
            f.extend_from_slice(&val.to_le_bytes());
        }
        assert_eq!(f.len() as u64, total);
        f
    }

    #[test]
    fn follows_needed_through_runpath_system_dirs_and_sonames() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["bin", "bin/lib", "sys", "other"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let ld = d.join("sys/ld-test.so.2");
        std::fs::write(&ld, elf(None, &[], Some("ld-test.so.2"))).unwrap();
        // libb needs the loader by soname (satisfied, as libc's need of ld-linux is) and libc.
        std::fs::write(
            d.join("bin/lib/liba.so.1"),
            elf(None, &[(DT_NEEDED, "libb.so.1")], Some("liba.so.1")),
        )
        .unwrap();
        std::fs::write(
            d.join("sys/libb.so.1"),
            elf(
                None,
                &[(DT_NEEDED, "ld-test.so.2"), (DT_NEEDED, "libc.so.6")],
                None,
            ),
        )
        .unwrap();
        std::fs::write(d.join("sys/libc.so.6"), elf(None, &[], None)).unwrap();
        // Not an ELF: skipped in favour of the next directory.
        std::fs::write(d.join("other/libc.so.6"), b"not elf").unwrap();
        let prog = d.join("bin/prog");
        std::fs::write(
            &prog,
            elf(
                Some(&ld.to_string_lossy()),
                &[
                    (DT_NEEDED, "liba.so.1"),
                    (DT_NEEDED, "libc.so.6"),
                    (DT_RUNPATH, "$ORIGIN/lib"),
                ],
                None,
            ),
        )
        .unwrap();
        let system = vec![d.join("other"), d.join("sys")];
        let libs = shared_libs_in(&prog, &system).expect("resolves");
        assert_eq!(
            libs,
            vec![
                d.join("bin/lib/liba.so.1"),
                d.join("sys/libc.so.6"),
                d.join("sys/libb.so.1"),
                ld.clone(),
            ]
        );

        // A name found nowhere is an error naming it and the directories searched.
        std::fs::remove_file(d.join("sys/libb.so.1")).unwrap();
        let err = shared_libs_in(&prog, &system).unwrap_err().to_string();
        assert!(
            err.contains("needs libb.so.1") && err.contains("sys"),
            "{err}"
        );
    }

    #[test]
    fn static_programs_need_nothing_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("static");
        std::fs::write(&p, elf(None, &[], None)).unwrap();
        assert!(shared_libs_in(&p, &[]).unwrap().is_empty());
        for (bytes, why) in [
            (b"#!/bin/sh\n".to_vec(), "not an ELF"),
            (b"\x7fELF\x01\x01".to_vec(), "not an ELF"),
            (
                [b"\x7fELF\x01\x01".as_slice(), &[0u8; 58]].concat(),
                "64-bit",
            ),
        ] {
            std::fs::write(&p, bytes).unwrap();
            let err = shared_libs_in(&p, &[]).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
        // Truncated inside the dynamic segment.
        let mut bytes = elf(None, &[(DT_NEEDED, "libx.so")], None);
        bytes.truncate(bytes.len() - 8);
        std::fs::write(&p, bytes).unwrap();
        assert!(shared_libs_in(&p, &[]).is_err());
    }

    #[test]
    fn ld_so_conf_includes_and_globs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("conf.d")).unwrap();
        std::fs::write(d.join("ld.so.conf"), "include conf.d/*.conf\n/opt/x # c\n").unwrap();
        std::fs::write(d.join("conf.d/b.conf"), "/b1\n/lib\n").unwrap();
        std::fs::write(d.join("conf.d/a.conf"), "# none\n/a1=libc6\n").unwrap();
        std::fs::write(d.join("conf.d/a.conf.bak"), "/never\n").unwrap();
        let dirs = system_dirs(&d.join("ld.so.conf"));
        let head: Vec<PathBuf> = dirs.iter().take(4).cloned().collect();
        let want: Vec<PathBuf> = ["/a1", "/b1", "/lib", "/opt/x"].map(PathBuf::from).to_vec();
        assert_eq!(head, want);
        assert!(!dirs.contains(&PathBuf::from("/never")));
        // The defaults follow, each once.
        assert_eq!(dirs.iter().filter(|p| *p == Path::new("/lib")).count(), 1);
        assert!(dirs.contains(&PathBuf::from("/usr/lib/x86_64-linux-gnu")));
        assert!(wildcard(&["", ".conf"], "x.conf") && !wildcard(&["", ".conf"], "x.conf.bak"));
    }

    /// The shared objects mapped into this very process are what the loader loaded for it: the
    /// list for our own binary must name the same files (the microvm backend lists `hive-box`
    /// from inside `hive-box`).
    #[test]
    fn matches_what_the_loader_mapped_into_this_process() {
        let exe = std::env::current_exe().unwrap();
        let libs = shared_libs(&exe).expect("our own libraries");
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let ours: BTreeSet<PathBuf> = libs.iter().map(|p| canon(p)).collect();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let exe = canon(&exe);
        let mapped: BTreeSet<PathBuf> = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| p.starts_with('/') && p.contains(".so"))
            .map(|p| canon(Path::new(p)))
            .filter(|p| *p != exe)
            .collect();
        assert_eq!(ours, mapped, "listed {libs:?}");
    }

    /// Where `ldd` exists (it is what this replaced), both give the same paths: the jail binds
    /// the same files at the same places as before.
    #[test]
    fn agrees_with_ldd() {
        let exe = std::env::current_exe().unwrap();
        let Ok(out) = std::process::Command::new("ldd").arg(&exe).output() else {
            eprintln!("agrees_with_ldd: no ldd on this host; comparison skipped");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let mut want = BTreeSet::new();
        for line in text.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                want.insert(PathBuf::from(p));
            }
        }
        let got: BTreeSet<PathBuf> = shared_libs(&exe).unwrap().into_iter().collect();
        assert_eq!(got, want, "ldd said:\n{text}");
    }
}
