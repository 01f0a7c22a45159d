//! The addresses of workspaces, persisted in `<state>/leases.json` (written by
//! rename, before the TAP device that uses the address is made).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Leases {
    /// Workspace id → its address.
    pub by_workspace: BTreeMap<String, Ipv4Addr>,
    /// Workspace id → what it may reach, where that is more than the default.
    #[serde(default)]
    pub policies: BTreeMap<String, crate::protocol::Policy>,
    /// Team name → its workspaces.
    #[serde(default)]
    pub teams: BTreeMap<String, Vec<String>>,
    /// Port forwards, by host port.
    #[serde(default)]
    pub forwards: BTreeMap<u16, crate::protocol::Forward>,
}

impl Leases {
    /// What `workspace` may reach (the default when nothing was recorded).
    pub fn policy_of(&self, workspace: &str) -> crate::protocol::Policy {
        self.policies.get(workspace).cloned().unwrap_or_default()
    }

    /// Forgets `workspace` entirely.
    pub fn remove(&mut self, workspace: &str) {
        self.by_workspace.remove(workspace);
        self.policies.remove(workspace);
        for members in self.teams.values_mut() {
            members.retain(|w| w != workspace);
        }
        self.forwards.retain(|_, f| f.workspace != workspace);
    }

    /// The forward of `workspace`'s `guest_port`, if there is one.
    pub fn forward_of(
        &self,
        workspace: &str,
        guest_port: u16,
    ) -> Option<&crate::protocol::Forward> {
        self.forwards
            .values()
            .find(|f| f.workspace == workspace && f.guest_port == guest_port)
    }

    /// Team name → the addresses of its members that have one.
    pub fn team_addresses(&self) -> BTreeMap<String, Vec<Ipv4Addr>> {
        self.teams
            .iter()
            .map(|(t, ws)| {
                let ips = ws
                    .iter()
                    .filter_map(|w| self.by_workspace.get(w).copied())
                    .collect();
                (t.clone(), ips)
            })
            .collect()
    }

    /// (address, policy) of every workspace with an address.
    pub fn members(&self) -> Vec<(Ipv4Addr, crate::protocol::Policy)> {
        self.by_workspace
            .iter()
            .map(|(w, ip)| (*ip, self.policy_of(w)))
            .collect()
    }
}

pub(crate) struct Store {
    path: PathBuf,
    pub leases: Leases,
}

impl Store {
    pub fn load(dir: &Path) -> std::io::Result<Store> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("leases.json");
        let leases = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Leases::default(),
            Err(e) => return Err(e),
        };
        Ok(Store { path, leases })
    }

    pub fn save(&self) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.partial");
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&self.leases).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, &self.path)
    }

    /// `workspace`'s address: the one it has, or the lowest free one in the
    /// subnet after the gateway.
    pub fn allocate(&mut self, workspace: &str, gateway: Ipv4Addr, prefix: u8) -> Option<Ipv4Addr> {
        if let Some(ip) = self.leases.by_workspace.get(workspace) {
            return Some(*ip);
        }
        let base = u32::from(gateway) & !((1u64 << (32 - prefix as u32)) - 1) as u32;
        let size = 1u32 << (32 - prefix as u32);
        let taken: std::collections::HashSet<Ipv4Addr> =
            self.leases.by_workspace.values().copied().collect();
        let ip = (1..size - 1)
            .map(|i| Ipv4Addr::from(base + i))
            .find(|ip| *ip != gateway && !taken.contains(ip))?;
        self.leases.by_workspace.insert(workspace.to_string(), ip);
        Some(ip)
    }
}

/// A locally administered MAC address derived from the IPv4 address.
pub(crate) fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x62, o[0], o[1], o[2], o[3]]
}

pub(crate) fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_stable_and_never_shared() -> std::io::Result<()> {
        let t = tempfile::tempdir()?;
        let gw = Ipv4Addr::new(10, 213, 0, 1);
        let mut s = Store::load(t.path())?;
        let a = s.allocate("a", gw, 16);
        let b = s.allocate("b", gw, 16);
        assert_eq!(a, Some(Ipv4Addr::new(10, 213, 0, 2)));
        assert_eq!(b, Some(Ipv4Addr::new(10, 213, 0, 3)));
        assert_eq!(s.allocate("a", gw, 16), a);
        s.save()?;
        let mut s = Store::load(t.path())?;
        assert_eq!(s.allocate("b", gw, 16), b);
        s.leases.remove("a");
        assert_eq!(
            s.allocate("c", gw, 16),
            a,
            "a freed address is reused only once free"
        );
        let mut tiny = Store::load(&t.path().join("tiny"))?;
        let gw30 = Ipv4Addr::new(10, 0, 0, 1);
        assert!(tiny.allocate("x", gw30, 30).is_some());
        assert!(
            tiny.allocate("y", gw30, 30).is_none(),
            "a /30 holds one guest"
        );
        assert_eq!(
            mac_string(mac_for(Ipv4Addr::new(10, 213, 0, 2))),
            "02:62:0a:d5:00:02"
        );
        Ok(())
    }
}
