//! A task's figures for containerd (`ctr task metrics`, CRI's ContainerStats):
//! the guest's cgroup v2 figures, as libcgroups reads them inside the VM,
//! put into containerd's cgroups v2 `Metrics`.

use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use serde_json::Value;

/// The type containerd reads a v2 task's metrics as.
const METRICS_TYPE: &str = "io.containerd.cgroups.v2.Metrics";

/// `stats` is guest-made JSON: a missing or mistyped figure reads as 0.
pub fn to_any(stats: &Value) -> Result<Any, String> {
    let n = |path: &str| stats.pointer(path).and_then(Value::as_u64).unwrap_or(0);
    let m = |key: &str| n(&format!("/memory/stats/{key}"));
    let metrics = Metrics {
        pids: MessageField::some(PidsStat {
            current: n("/pids/current"),
            limit: n("/pids/limit"),
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            // cgroup v2 counts in microseconds, and so does libcgroups' v2.
            usage_usec: n("/cpu/usage/usage_total"),
            user_usec: n("/cpu/usage/usage_user"),
            system_usec: n("/cpu/usage/usage_kernel"),
            nr_periods: n("/cpu/throttling/periods"),
            nr_throttled: n("/cpu/throttling/throttled_periods"),
            throttled_usec: n("/cpu/throttling/throttled_time"),
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: n("/memory/memory/usage"),
            usage_limit: n("/memory/memory/limit"),
            max_usage: n("/memory/memory/max_usage"),
            swap_usage: n("/memory/memswap/usage"),
            swap_limit: n("/memory/memswap/limit"),
            anon: m("anon"),
            file: m("file"),
            kernel_stack: m("kernel_stack"),
            slab: m("slab"),
            sock: m("sock"),
            shmem: m("shmem"),
            file_mapped: m("file_mapped"),
            file_dirty: m("file_dirty"),
            file_writeback: m("file_writeback"),
            inactive_anon: m("inactive_anon"),
            active_anon: m("active_anon"),
            inactive_file: m("inactive_file"),
            active_file: m("active_file"),
            unevictable: m("unevictable"),
            pgfault: m("pgfault"),
            pgmajfault: m("pgmajfault"),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(Any {
        type_url: METRICS_TYPE.to_string(),
        value: metrics.write_to_bytes().map_err(|e| e.to_string())?,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn libcgroups_figures_become_containerds_metrics() {
        let stats = json!({
            "pids": {"current": 3, "limit": 0},
            "cpu": {"usage": {"usage_total": 1500, "usage_user": 1000, "usage_kernel": 500},
                    "throttling": {"periods": 0, "throttled_periods": 0, "throttled_time": 0}},
            "memory": {"memory": {"usage": 4096, "limit": 1 << 30, "max_usage": 8192},
                       "memswap": {"usage": 0, "limit": 0},
                       "stats": {"anon": 2048, "file": 1024, "pgfault": 7}},
        });
        let any = to_any(&stats).expect("metrics");
        assert_eq!(any.type_url, METRICS_TYPE);
        let m = Metrics::parse_from_bytes(&any.value).expect("decode");
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.cpu.system_usec, 500);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 1 << 30);
        assert_eq!(m.memory.anon, 2048);
        assert_eq!(m.memory.pgfault, 7);
    }

    /// The guest writes these figures: garbage reads as zeros, never a failure.
    #[test]
    fn garbled_figures_read_as_zero() {
        let any = to_any(&json!({"pids": {"current": "many"}, "cpu": [1, 2]})).expect("metrics");
        let m = Metrics::parse_from_bytes(&any.value).expect("decode");
        assert_eq!(m.pids.current, 0);
        assert_eq!(m.cpu.usage_usec, 0);
    }
}
