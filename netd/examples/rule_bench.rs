//! Rule update latency: how long a policy change takes to be in the kernel, with
//! 10 and with 100 workspaces' worth of rules (every workspace with an address,
//! half of them allowed out, some port-limited, in teams). Runs burrow-netd in a
//! network namespace it creates and removes. Medians of `--runs` changes.
//!
//!   cargo run --release -p burrow-netd --example rule_bench -- [--runs N]
//!
//! Needs root (`ip netns`).

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::Instant;

use burrow_netd::NetClient;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn measure(n: usize, runs: usize, netd: &std::path::Path) -> Result<(f64, f64, f64)> {
    let ns = format!("bnbench{}-{n}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()?
        .success();
    if !ok {
        return Err(format!("ip netns add {ns}").into());
    }
    let dir = tempfile::tempdir()?;
    let result = (|| -> Result<(f64, f64, f64)> {
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
        let run = || -> Result<(f64, f64, f64)> {
            let ids: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
            for (i, id) in ids.iter().enumerate() {
                let (_lease, _tap) = c.attach(id)?; // the TAP goes with the fd; the address stays
                let ports = if i % 3 == 0 {
                    Some(vec![443, 80])
                } else {
                    None
                };
                c.set_policy(id, Some(i % 2 == 0), Some(i % 4 == 0), ports)?;
            }
            for t in 0..n / 4 {
                c.set_team(&format!("t{t}"), ids[t * 4..t * 4 + 2].to_vec())?;
            }
            // A change of one workspace's policy: set elements only.
            let mut toggle = Vec::new();
            for r in 0..runs {
                let start = Instant::now();
                c.set_policy("w1", Some(r % 2 == 0), None, None)?;
                toggle.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            let mut ports = Vec::new();
            for r in 0..runs {
                let start = Instant::now();
                c.set_policy(
                    "w1",
                    None,
                    None,
                    Some(if r % 2 == 0 { vec![443] } else { vec![] }),
                )?;
                ports.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            // A team change: the table rebuilt in one batch.
            let mut team = Vec::new();
            for r in 0..runs {
                let start = Instant::now();
                c.set_team("extra", vec![ids[r % n].clone()])?;
                team.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            Ok((median(toggle), median(ports), median(team)))
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
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(21);
    let netd = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("burrow-netd"))
        .ok_or("no burrow-netd next to the example")?;
    println!("burrow-netd rule update latency (request to kernel, medians of {runs})");
    let mut rows = Vec::new();
    for n in [10, 100] {
        let (toggle, ports, team) = measure(n, runs, &netd)?;
        println!(
            "  {n:3} workspaces: internet on/off {toggle:6.2} ms   allowed ports {ports:6.2} ms   team change (rebuild) {team:6.2} ms"
        );
        rows.push((toggle, ports, team));
    }
    println!(
        "  100 vs 10: policy change {:.2} x, allowed ports {:.2} x (target: O(1), <= 50 ms)",
        rows[1].0 / rows[0].0,
        rows[1].1 / rows[0].1
    );
    Ok(())
}
