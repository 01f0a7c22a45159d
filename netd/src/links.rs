//! Links, through rtnetlink: the bridge and the TAP devices on it.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use futures_util::TryStreamExt;
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec};

pub type LinkResult<T> = Result<T, String>;

async fn index_of(handle: &Handle, name: &str) -> LinkResult<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(l)) => Ok(Some(l.header.index)),
        Ok(None) => Ok(None),
        // ENODEV: no such link.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(format!("get link {name}: {e}")),
    }
}

/// Makes the bridge exist, be up, and hold `gateway/prefix` (and only that).
pub(crate) async fn ensure_bridge(
    handle: &Handle,
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
) -> LinkResult<u32> {
    let index = match index_of(handle, name).await? {
        Some(i) => i,
        None => {
            handle
                .link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
                .map_err(|e| format!("add bridge {name}: {e}"))?;
            index_of(handle, name)
                .await?
                .ok_or_else(|| format!("bridge {name} vanished"))?
        }
    };
    let mut addrs = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    let mut has = false;
    while let Some(a) = addrs
        .try_next()
        .await
        .map_err(|e| format!("addresses of {name}: {e}"))?
    {
        use rtnetlink::packet_route::address::AddressAttribute;
        let mine = a.header.prefix_len == prefix
            && a.attributes.iter().any(|at| matches!(at, AddressAttribute::Address(std::net::IpAddr::V4(ip)) if *ip == gateway));
        if mine {
            has = true;
        } else {
            handle
                .address()
                .del(a)
                .execute()
                .await
                .map_err(|e| format!("remove a stale address of {name}: {e}"))?;
        }
    }
    if !has {
        handle
            .address()
            .add(index, gateway.into(), prefix)
            .execute()
            .await
            .map_err(|e| format!("address {gateway}/{prefix} on {name}: {e}"))?;
    }
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| format!("set {name} up: {e}"))?;
    Ok(index)
}

/// Creates TAP device `name` in the calling thread's network namespace (not
/// persistent: it goes when the last descriptor on it is closed, that is when its
/// VM's QEMU exits) and returns that descriptor.
pub fn open_tap(name: &str, mac: [u8; 6]) -> LinkResult<OwnedFd> {
    let path = c"/dev/net/tun";
    // SAFETY: open of a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(format!(
            "open /dev/net/tun: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh fd we own.
    let tun = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes `req`, which lives across the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(format!(
            "create TAP {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let _ = mac; // the guest's MAC is set on its virtio-net device, not on the TAP
    Ok(tun)
}

/// Puts `tap` on the bridge as an isolated port and brings it up.
pub(crate) async fn plug(handle: &Handle, tap: &str, bridge: u32) -> LinkResult<()> {
    let index = index_of(handle, tap)
        .await?
        .ok_or_else(|| format!("TAP {tap} vanished"))?;
    handle
        .link()
        .set(
            LinkUnspec::new_with_index(index)
                .controller(bridge)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(|e| format!("put {tap} on the bridge: {e}"))?;
    // Isolated: frames from this port reach only the bridge itself (the host),
    // never another port. What workspaces may say to each other is decided when
    // the host routes their packets.
    handle
        .link()
        .set_port(LinkBridgePort::new(index).isolated(true).build())
        .execute()
        .await
        .map_err(|e| format!("isolate {tap}: {e}"))?;
    Ok(())
}

/// The names of the TAP devices on the bridge now.
pub(crate) async fn ports(handle: &Handle, bridge: u32) -> LinkResult<Vec<String>> {
    use rtnetlink::packet_route::link::LinkAttribute;
    let mut out = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(l) = links
        .try_next()
        .await
        .map_err(|e| format!("list links: {e}"))?
    {
        let on_bridge = l
            .attributes
            .iter()
            .any(|a| matches!(a, LinkAttribute::Controller(c) if *c == bridge));
        if on_bridge {
            if let Some(name) = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfName(n) => Some(n.clone()),
                _ => None,
            }) {
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// Deletes link `index`.
pub(crate) async fn delete(handle: &Handle, index: u32) -> LinkResult<()> {
    handle
        .link()
        .del(index)
        .execute()
        .await
        .map_err(|e| format!("delete link {index}: {e}"))
}

/// The namespace's IPv4 routes (every table): destination and output device.
pub(crate) async fn routes(handle: &Handle) -> LinkResult<Vec<(crate::protocol::Cidr, String)>> {
    use rtnetlink::packet_route::link::LinkAttribute;
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    let mut names = std::collections::HashMap::new();
    let mut links = handle.link().get().execute();
    while let Some(l) = links
        .try_next()
        .await
        .map_err(|e| format!("list links: {e}"))?
    {
        if let Some(n) = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        }) {
            names.insert(l.header.index, n);
        }
    }
    let mut out = Vec::new();
    let mut routes = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(r) = routes
        .try_next()
        .await
        .map_err(|e| format!("list routes: {e}"))?
    {
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
            _ => None,
        });
        let dev = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Oif(i) => names.get(i).cloned(),
                _ => None,
            })
            .unwrap_or_default();
        let prefix = r.header.destination_prefix_length;
        let net = dst.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix.min(32)))
        };
        out.push((
            crate::protocol::Cidr {
                net: Ipv4Addr::from(u32::from(net) & mask),
                prefix,
            },
            dev,
        ));
    }
    Ok(out)
}
