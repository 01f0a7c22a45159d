//! What the FUSE store holds, as it is on disk: every volume and snapshot is a
//! chain of layers, bottom first, persisted as one small JSON file each.
//!
//! Layout under the store's root:
//! - `images/<key>/`: an imported image, the bottom layer of its volumes;
//! - `layers/<id>/`: every other layer; a volume's last layer is its writable
//!   upper, every other layer is frozen and may be shared by many chains;
//! - `meta/volumes/<id>.json`, `meta/snapshots/<volume>/<name>.json`: the chains;
//! - `mnt/`: where the server mounts the merged views.
//!
//! Each operation writes at most one chain file, atomically (a rename), after the
//! layers it names exist: a crash leaves either the old chain or the new one, and
//! layers no chain names are garbage that [`Catalog::collect`] removes.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::layout::{DOOMED, PARTIAL};

#[derive(serde::Serialize, serde::Deserialize)]
struct ChainFile {
    layers: Vec<String>,
}

pub(crate) struct Catalog {
    root: PathBuf,
    pub volumes: BTreeMap<String, Vec<String>>,
    pub snapshots: BTreeMap<(String, String), Vec<String>>,
    /// Disk limits of volumes, in bytes (`meta/limits/<id>`, one decimal number).
    pub limits: BTreeMap<String, u64>,
}

impl Catalog {
    pub fn load(root: &Path) -> io::Result<Catalog> {
        // The server runs under umask 0: its directories get their mode here.
        for d in [
            "",
            "images",
            "layers",
            "meta",
            "meta/volumes",
            "meta/snapshots",
            "meta/limits",
        ] {
            crate::private_dir(&root.join(d)).map_err(io::Error::other)?;
        }
        // Mounted already when a server serves it (a daemon restart).
        crate::private_mountpoint(&root.join("mnt")).map_err(io::Error::other)?;
        let mut c = Catalog {
            root: root.to_path_buf(),
            volumes: BTreeMap::new(),
            snapshots: BTreeMap::new(),
            limits: BTreeMap::new(),
        };
        for e in std::fs::read_dir(root.join("meta/limits"))?.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|t| t.trim().parse::<u64>().ok());
            if let (false, Some(b)) = (id.starts_with('.'), bytes) {
                c.limits.insert(id, b);
            }
        }
        for (id, path) in json_files(&root.join("meta/volumes")) {
            c.volumes.insert(id, read_chain(&path)?);
        }
        for dir in crate::layout::subdirs(&root.join("meta/snapshots")) {
            let Some(vol) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            for (name, path) in json_files(&dir) {
                c.snapshots.insert((vol.clone(), name), read_chain(&path)?);
            }
        }
        Ok(c)
    }

    pub fn layer_path(&self, layer: &str) -> PathBuf {
        self.root.join(layer)
    }

    pub fn paths(&self, chain: &[String]) -> Vec<PathBuf> {
        chain.iter().map(|l| self.layer_path(l)).collect()
    }

    /// A new, empty layer to go on top of `below`: its root takes the owner, mode
    /// and times of `below`'s root, which is what the merged view shows.
    pub fn new_layer(&self, below: &str) -> io::Result<String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let id = format!(
            "{nanos:x}-{:x}-{:x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let layers = self.root.join("layers");
        let partial = layers.join(format!("{PARTIAL}{id}"));
        super::layer::copy_entry(&self.layer_path(below), &partial)?;
        std::fs::rename(&partial, layers.join(&id))?;
        Ok(format!("layers/{id}"))
    }

    pub fn save_volume(&mut self, id: &str, chain: Vec<String>) -> io::Result<()> {
        write_chain(&self.root.join("meta/volumes"), id, &chain)?;
        self.volumes.insert(id.to_string(), chain);
        Ok(())
    }

    /// Records volume `id`'s disk limit (`None`: none).
    pub fn set_limit(&mut self, id: &str, bytes: Option<u64>) -> io::Result<()> {
        let dir = self.root.join("meta/limits");
        match bytes {
            Some(b) => {
                let tmp = dir.join(format!("{PARTIAL}{id}"));
                std::fs::write(&tmp, format!("{b}\n"))?;
                std::fs::rename(&tmp, dir.join(id))?;
                self.limits.insert(id.to_string(), b);
            }
            None => {
                remove_if_there(&dir.join(id))?;
                self.limits.remove(id);
            }
        }
        Ok(())
    }

    pub fn remove_volume(&mut self, id: &str) -> io::Result<()> {
        remove_if_there(&self.root.join(format!("meta/volumes/{id}.json")))?;
        self.volumes.remove(id);
        self.set_limit(id, None)?;
        Ok(())
    }

    pub fn save_snapshot(
        &mut self,
        volume: &str,
        name: &str,
        chain: Vec<String>,
    ) -> io::Result<()> {
        let dir = self.root.join("meta/snapshots").join(volume);
        crate::private_dir(&dir).map_err(io::Error::other)?;
        write_chain(&dir, name, &chain)?;
        self.snapshots
            .insert((volume.to_string(), name.to_string()), chain);
        Ok(())
    }

    pub fn remove_snapshot(&mut self, volume: &str, name: &str) -> io::Result<()> {
        let dir = self.root.join("meta/snapshots").join(volume);
        remove_if_there(&dir.join(format!("{name}.json")))?;
        let _ = std::fs::remove_dir(&dir); // only when it was the last one
        self.snapshots
            .remove(&(volume.to_string(), name.to_string()));
        Ok(())
    }

    /// How many chains name each layer.
    pub fn references(&self) -> BTreeMap<&str, usize> {
        let mut refs = BTreeMap::new();
        for chain in self.volumes.values().chain(self.snapshots.values()) {
            for l in chain {
                *refs.entry(l.as_str()).or_insert(0) += 1;
            }
        }
        refs
    }

    /// Moves every layer no chain names (and every half-made one) out of the way,
    /// under a `.doomed-` name, and returns those paths: the caller deletes them
    /// when it holds no lock. Images other than `keep_image` that no chain names go
    /// too, when one is given.
    pub fn collect(&self, keep_image: Option<&str>) -> Vec<PathBuf> {
        let refs = self.references();
        let mut doomed = Vec::new();
        let mut dirs = vec!["layers"];
        if keep_image.is_some() {
            dirs.push("images");
        }
        for dir in dirs {
            let base = self.root.join(dir);
            for entry in std::fs::read_dir(&base).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(DOOMED) {
                    doomed.push(entry.path());
                    continue;
                }
                let layer = format!("{dir}/{name}");
                let keep = refs.contains_key(layer.as_str())
                    || (dir == "images" && keep_image == Some(layer.as_str()));
                if keep && !name.starts_with(PARTIAL) {
                    continue;
                }
                let to = base.join(format!("{DOOMED}{name}"));
                if std::fs::rename(entry.path(), &to).is_ok() {
                    doomed.push(to);
                }
            }
        }
        doomed
    }

    /// Snapshot names of `volume`, sorted.
    pub fn snapshot_names(&self, volume: &str) -> Vec<String> {
        self.snapshots
            .keys()
            .filter(|(v, _)| v == volume)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Volumes that have snapshots.
    pub fn volumes_with_snapshots(&self) -> BTreeSet<String> {
        self.snapshots.keys().map(|(v, _)| v.clone()).collect()
    }
}

/// `<stem>.json` files in `dir`, as (stem, path).
fn json_files(dir: &Path) -> Vec<(String, PathBuf)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".json")?;
            (!stem.starts_with('.')).then(|| (stem.to_string(), e.path()))
        })
        .collect()
}

fn read_chain(path: &Path) -> io::Result<Vec<String>> {
    let text = std::fs::read(path)?;
    let chain: ChainFile = serde_json::from_slice(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    Ok(chain.layers)
}

fn write_chain(dir: &Path, stem: &str, chain: &[String]) -> io::Result<()> {
    let tmp = dir.join(format!("{PARTIAL}{stem}.json"));
    let body = serde_json::to_vec(&ChainFile {
        layers: chain.to_vec(),
    })
    .map_err(io::Error::other)?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, dir.join(format!("{stem}.json")))
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Deletes what [`Catalog::collect`] moved aside.
pub(crate) fn remove_doomed(paths: Vec<PathBuf>) {
    for p in paths {
        let _ = std::fs::remove_dir_all(&p);
    }
}
