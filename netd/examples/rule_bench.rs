//! Rule update latency: how long a policy change takes to be in the kernel, with
//! 10 and with 100 workspaces' worth of rules (every workspace with an address,
//! half of them allowed out, some port-limited, in teams). Runs burrow-netd in a
//! network namespace it creates and removes. Medians of `--runs` changes.
//! Every workspace is attached, so its port identity chain is in the netdev
//! table too.
//!
//!   cargo run --release -p burrow-netd --example rule_bench -- [--runs N] [--smoke]
//!
//! `--smoke`: one change of each kind, no target checked (for `make test`).
//!
//! Needs root (`ip netns`).

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Instant;

use burrow_netd::protocol::PolicyChange;
use burrow_netd::NetClient;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Figures {
    toggle: f64,
    ports: f64,
    host_ports: f64,
    cidr: f64,
    team: f64,
}

fn measure(n: usize, runs: usize, netd: &std::path::Path) -> Result<Figures> {
    let ns = format!("bnbench{}-{n}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()?
        .success();
    if !ok {
        return Err(format!("ip netns add {ns}").into());
    }
    let dir = tempfile::tempdir()?;
    let result = (|| -> Result<Figures> {
        let mut child = Command::new(netd)
            .arg("--state")
            .arg(dir.path().join("state"))
            .arg("--socket")
            .arg(dir.path().join("netd.sock"))
            .args(["--netns", &ns])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        let c = NetClient::new(dir.path().join("netd.sock"));
        let run = || -> Result<Figures> {
            let ids: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
            for (i, id) in ids.iter().enumerate() {
                let (_lease, _tap) = c.attach(id)?; // the TAP goes with the fd; the address stays
                let ports = if i % 3 == 0 {
                    Some(vec![443, 80])
                } else {
                    None
                };
                let change = PolicyChange {
                    allow_internet: Some(i % 2 == 0),
                    allow_inter_vm: Some(i % 4 == 0),
                    allowed_ports: ports,
                    allow_host_ports: (i % 5 == 0).then(|| vec![8000]),
                    allow_cidr: (i % 6 == 0).then(|| vec!["10.99.0.0/16".to_string()]),
                };
                c.set_policy(id, change)?;
            }
            for t in 0..n / 4 {
                c.set_team(&format!("t{t}"), ids[t * 4..t * 4 + 2].to_vec())?;
            }
            // A change of one workspace's policy: set elements only.
            let mut toggle = Vec::new();
            for r in 0..runs {
                let start = Instant::now();
                let change = PolicyChange {
                    allow_internet: Some(r % 2 == 0),
                    ..Default::default()
                };
                c.set_policy("w1", change)?;
                toggle.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            let mut ports = Vec::new();
            for r in 0..runs {
                let start = Instant::now();
                let change = PolicyChange {
                    allowed_ports: Some(if r % 2 == 0 { vec![443] } else { vec![] }),
                    ..Default::default()
                };
                c.set_policy("w1", change)?;
                ports.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            // Opening a host port, and a private range, both already in use by
            // other workspaces: set elements only.
            let mut host_ports = Vec::new();
            for r in 0..runs {
                let start = Instant::now();
                let change = PolicyChange {
                    allow_host_ports: Some(if r % 2 == 0 { vec![8000] } else { vec![] }),
                    ..Default::default()
                };
                c.set_policy("w1", change)?;
                host_ports.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            let mut cidr = Vec::new();
            for r in 0..runs {
                let start = Instant::now();
                let list = if r % 2 == 0 {
                    vec!["10.99.0.0/16".to_string()]
                } else {
                    vec![]
                };
                let change = PolicyChange {
                    allow_cidr: Some(list),
                    ..Default::default()
                };
                c.set_policy("w1", change)?;
                cidr.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            // A team change: the table rebuilt in one batch.
            let mut team = Vec::new();
            for r in 0..runs {
                let start = Instant::now();
                c.set_team("extra", vec![ids[r % n].clone()])?;
                team.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            Ok(Figures {
                toggle: median(toggle),
                ports: median(ports),
                host_ports: median(host_ports),
                cidr: median(cidr),
                team: median(team),
            })
        };
        let r = run();
        let _ = child.kill();
        let _ = child.wait();
        r
    })();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    result
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let runs = if smoke {
        1
    } else {
        args.iter()
            .position(|a| a == "--runs")
            .and_then(|i| args.get(i + 1))
            .and_then(|r| r.parse().ok())
            .unwrap_or(21)
    };
    let netd = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("burrow-netd"))
        .ok_or("no burrow-netd next to the example")?;
    println!("burrow-netd rule update latency (request to kernel, medians of {runs})");
    let mut rows = Vec::new();
    for n in [10, 100] {
        let f = measure(n, runs, &netd)?;
        println!(
            "  {n:3} workspaces: internet on/off {:6.2} ms   allowed ports {:6.2} ms   host ports {:6.2} ms   allow cidr {:6.2} ms   team change (rebuild) {:6.2} ms",
            f.toggle, f.ports, f.host_ports, f.cidr, f.team
        );
        rows.push(f);
    }
    println!(
        "  100 vs 10: policy change {:.2} x, allowed ports {:.2} x, host ports {:.2} x, allow cidr {:.2} x (target: O(1), <= 50 ms)",
        rows[1].toggle / rows[0].toggle,
        rows[1].ports / rows[0].ports,
        rows[1].host_ports / rows[0].host_ports,
        rows[1].cidr / rows[0].cidr,
    );
    if smoke {
        println!("  (smoke run: one change each, no target checked)");
    }
    Ok(())
}
