//! Data parallel: one process per device ("rank"), started by `qscript --nproc-per-node N` or by
//! a launcher such as `torchrun`, which both set torchrun's variables (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`). The ranks form a [`Group`]:
//! rank 0 listens on the master address and every other rank connects to it. The group sums
//! buffers over the ranks (the gradients of a step, its loss), so every rank takes the same
//! optimizer step; rank 0 alone writes (metrics, checkpoints, logs). A rank that dies closes its
//! connection and the others stop with an error that names it.

#[cfg(feature = "cuda")]
pub mod nccl;
mod tcp;

use std::sync::{Arc, OnceLock};

pub use tcp::Group;

use crate::{Error, Result};

/// Where this process stands among the ranks of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    /// This process's rank, `0..size`.
    pub rank: usize,
    /// Ranks in the run.
    pub size: usize,
    /// Rank on this machine (its GPU: `cuda:{local_rank}`).
    pub local_rank: usize,
    /// Ranks on this machine.
    pub local_size: usize,
    /// Rank 0's address, where the group meets.
    pub master_addr: String,
    /// Rank 0's port.
    pub master_port: u16,
}

impl World {
    /// The world torchrun's variables describe, from `get` (the environment); `None` without
    /// `WORLD_SIZE` or with a world of one.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let Some(size) = get("WORLD_SIZE") else {
            return Ok(None);
        };
        let num = |name: &str, v: &str| -> Result<usize> {
            v.trim().parse().map_err(|_| {
                Error::InvalidArgument(format!(
                    "environment variable `{name}` is `{v}`; expected a whole number"
                ))
            })
        };
        let size = num("WORLD_SIZE", &size)?;
        if size == 0 {
            return Err(Error::InvalidArgument(
                "environment variable `WORLD_SIZE` is 0; expected 1 or more".into(),
            ));
        }
        if size == 1 {
            return Ok(None);
        }
        let need = |name: &str| {
            get(name).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "`WORLD_SIZE` is {size} but `{name}` is not set: start the ranks with \
                     `qscript --nproc-per-node N` or a launcher that sets torchrun's variables"
                ))
            })
        };
        let rank = num("RANK", &need("RANK")?)?;
        if rank >= size {
            return Err(Error::InvalidArgument(format!(
                "`RANK` is {rank}; expected 0..{} for a `WORLD_SIZE` of {size}",
                size - 1
            )));
        }
        let local_rank = match get("LOCAL_RANK") {
            Some(v) => num("LOCAL_RANK", &v)?,
            None => rank,
        };
        let local_size = match get("LOCAL_WORLD_SIZE") {
            Some(v) => num("LOCAL_WORLD_SIZE", &v)?,
            None => size,
        };
        if local_rank >= local_size.max(1) {
            return Err(Error::InvalidArgument(format!(
                "`LOCAL_RANK` is {local_rank}; expected 0..{} for a `LOCAL_WORLD_SIZE` of {local_size}",
                local_size.saturating_sub(1)
            )));
        }
        let master_addr = get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = need("MASTER_PORT")?;
        let master_port = port
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "environment variable `MASTER_PORT` is `{port}`; expected a port, 1..65535"
                ))
            })?;
        Ok(Some(Self {
            rank,
            size,
            local_rank,
            local_size,
            master_addr,
            master_port,
        }))
    }
}

static GROUP: OnceLock<std::result::Result<Option<Arc<Group>>, String>> = OnceLock::new();

thread_local! {
    /// A group set for this thread (tests run several ranks as threads of one process).
    static LOCAL: std::cell::RefCell<Option<Arc<Group>>> = const { std::cell::RefCell::new(None) };
}

/// Makes `group` this thread's group (`None`: the process's, from the environment).
pub fn set_thread_group(group: Option<Arc<Group>>) {
    LOCAL.with(|g| *g.borrow_mut() = group);
}

/// The group of this run: this thread's, else the one the environment describes (formed on the
/// first call; every rank must get here), else `None` (one process).
pub fn group() -> Result<Option<Arc<Group>>> {
    if let Some(g) = LOCAL.with(|g| g.borrow().clone()) {
        return Ok(Some(g));
    }
    GROUP
        .get_or_init(|| {
            let world = World::from_vars(|k| std::env::var(k).ok()).map_err(|e| e.to_string())?;
            match world {
                Some(w) => Group::connect(&w, tcp::timeout())
                    .map(|g| Some(Arc::new(g)))
                    .map_err(|e| e.to_string()),
                None => Ok(None),
            }
        })
        .clone()
        .map_err(Error::InvalidArgument)
}

/// The ranks of this process's run without forming the group: this thread's group, else
/// `WORLD_SIZE` (1 when unset or unreadable; forming the group reports a bad value). For tools
/// that count the ranks of a run (benchmarks); the trainer takes its [`Collective`]'s.
///
/// [`Collective`]: crate::train::collective::Collective
pub fn planned_size() -> usize {
    if let Some(n) = LOCAL.with(|g| g.borrow().as_ref().map(|g| g.size())) {
        return n;
    }
    std::env::var("WORLD_SIZE")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// This process's rank (0 in a run of one).
pub fn rank() -> usize {
    LOCAL
        .with(|g| g.borrow().as_ref().map(|g| g.rank()))
        .or_else(|| {
            GROUP
                .get()
                .and_then(|g| g.as_ref().ok().cloned().flatten())
                .map(|g| g.rank())
        })
        .unwrap_or(0)
}

/// The ranks' shares of one global micro-batch of `examples` examples: rank `r` takes
/// `[start, end)`, as even as can be (the first `examples % ranks` take one more).
pub fn share(examples: usize, ranks: usize, rank: usize) -> (usize, usize) {
    let ranks = ranks.max(1);
    let (base, extra) = (examples / ranks, examples % ranks);
    let start = rank * base + rank.min(extra);
    (start, start + base + usize::from(rank < extra))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_variables_give_the_world_and_bad_ones_name_themselves() {
        assert_eq!(World::from_vars(vars(&[])).unwrap(), None);
        assert_eq!(
            World::from_vars(vars(&[("WORLD_SIZE", "1")])).unwrap(),
            None
        );
        let w = World::from_vars(vars(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (w.rank, w.size, w.local_rank, w.local_size, w.master_port),
            (3, 4, 1, 2, 29500)
        );
        assert_eq!(w.master_addr, "10.0.0.1");
        let bad = |pairs: &[(&str, &str)]| World::from_vars(vars(pairs)).unwrap_err().to_string();
        assert!(bad(&[("WORLD_SIZE", "two")]).contains("`WORLD_SIZE` is `two`"));
        assert!(bad(&[("WORLD_SIZE", "0")]).contains("expected 1 or more"));
        assert!(bad(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("`RANK` is not set"));
        assert!(
            bad(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_PORT", "1")])
                .contains("expected 0..1")
        );
        assert!(bad(&[("WORLD_SIZE", "2"), ("RANK", "1")]).contains("`MASTER_PORT` is not set"));
        assert!(
            bad(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "99999")])
                .contains("expected a port")
        );
        assert!(
            bad(&[
                ("WORLD_SIZE", "2"),
                ("RANK", "1"),
                ("MASTER_PORT", "5"),
                ("LOCAL_RANK", "3"),
                ("LOCAL_WORLD_SIZE", "2")
            ])
            .contains("`LOCAL_RANK` is 3")
        );
    }

    #[test]
    fn shares_tile_the_micro_batch() {
        for (n, ranks) in [(8, 2), (7, 2), (3, 4), (0, 3)] {
            let mut next = 0;
            for r in 0..ranks {
                let (a, b) = share(n, ranks, r);
                assert_eq!(a, next);
                assert!(b - a <= n.div_ceil(ranks));
                next = b;
            }
            assert_eq!(next, n);
        }
    }
}
