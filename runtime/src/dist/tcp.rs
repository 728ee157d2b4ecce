//! The ranks' group over TCP: rank 0 listens on the master address, every other rank connects
//! to it (retrying while rank 0 starts) and says who it is. A sum over the ranks gathers every
//! buffer at rank 0, adds them in rank order (so every run adds the same way) and sends the sum
//! back. Messages are a little-endian u64 length and the bytes. A closed connection or a silence
//! longer than the timeout is an error that names the rank.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::World;
use crate::{Error, Result};

const HELLO: &[u8; 4] = b"QSDP";

/// How long a rank waits for the others (`QSCRIPT_DIST_TIMEOUT` seconds, default 1800: rank 0
/// may be evaluating or writing a checkpoint while the others wait).
pub(super) fn timeout() -> Duration {
    let secs = std::env::var("QSCRIPT_DIST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(1800);
    Duration::from_secs(secs)
}

/// The ranks of one run, connected.
#[derive(Debug)]
pub struct Group {
    rank: usize,
    size: usize,
    /// Rank 0: the stream of rank `r` at `r - 1`; the others: the stream to rank 0.
    peers: Mutex<Vec<TcpStream>>,
}

fn lost(rank: usize, e: &std::io::Error) -> Error {
    let why = match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            "stopped answering (timed out; `QSCRIPT_DIST_TIMEOUT` sets the wait in seconds)"
                .to_string()
        }
        _ => format!("closed its connection ({e})"),
    };
    Error::InvalidArgument(format!(
        "rank {rank} {why}: it failed or was stopped; its own output says why"
    ))
}

/// What a message is part of: ranks that make different calls (a bug, or a recipe that takes
/// another path on one rank) are told so instead of pairing unrelated buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Hello = 1,
    Sum = 2,
    Broadcast = 3,
}

impl Op {
    fn name(b: u8) -> &'static str {
        match b {
            1 => "a greeting",
            2 => "a sum",
            3 => "a broadcast",
            _ => "something unknown",
        }
    }
}

/// One write per message (the header and the bytes together: no wait on a delayed ACK).
fn send(s: &mut TcpStream, rank: usize, op: Op, bytes: &[u8]) -> Result<()> {
    let mut msg = Vec::with_capacity(9 + bytes.len());
    msg.extend((bytes.len() as u64).to_le_bytes());
    msg.push(op as u8);
    msg.extend(bytes);
    s.write_all(&msg).map_err(|e| lost(rank, &e))
}

fn recv(s: &mut TcpStream, rank: usize, op: Op, max: usize) -> Result<Vec<u8>> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).map_err(|e| lost(rank, &e))?;
    if head[8] != op as u8 {
        return Err(Error::InvalidArgument(format!(
            "the ranks are out of step: rank {rank} sent {} where {} was due (do all ranks run \
             the same recipe on the same data?)",
            Op::name(head[8]),
            Op::name(op as u8)
        )));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&head[..8]);
    let len = u64::from_le_bytes(len) as usize;
    if len > max {
        return Err(Error::InvalidArgument(format!(
            "rank {rank} sent {len} bytes where at most {max} were expected: do all ranks run the same recipe?"
        )));
    }
    let mut out = vec![0u8; len];
    s.read_exact(&mut out).map_err(|e| lost(rank, &e))?;
    Ok(out)
}

impl Group {
    /// Forms the group of `world`, waiting up to `timeout` for the other ranks.
    pub fn connect(world: &World, timeout: Duration) -> Result<Self> {
        let addr = format!("{}:{}", world.master_addr, world.master_port);
        let peers = if world.rank == 0 {
            let listener = TcpListener::bind(&addr).map_err(|e| {
                Error::InvalidArgument(format!(
                    "rank 0 cannot listen on `{addr}` (`MASTER_ADDR`:`MASTER_PORT`): {e}"
                ))
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|e| Error::io(std::path::Path::new(&addr), e))?;
            let start = Instant::now();
            let mut slots: Vec<Option<TcpStream>> = (1..world.size).map(|_| None).collect();
            while slots.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false).map_err(|e| lost(0, &e))?;
                        s.set_read_timeout(Some(timeout)).map_err(|e| lost(0, &e))?;
                        s.set_nodelay(true).map_err(|e| lost(0, &e))?;
                        let hello = recv(&mut s, usize::MAX, Op::Hello, 16)?;
                        let (r, n) = parse_hello(&hello)?;
                        if n != world.size || r == 0 || r >= world.size || slots[r - 1].is_some() {
                            return Err(Error::InvalidArgument(format!(
                                "a rank said it is rank {r} of {n}; this run has ranks 1..{} of {} (two runs on one `MASTER_PORT`?)",
                                world.size - 1,
                                world.size
                            )));
                        }
                        slots[r - 1] = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if start.elapsed() > timeout {
                            let missing: Vec<String> = slots
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            return Err(Error::InvalidArgument(format!(
                                "rank 0 waited {}s for rank(s) {} to connect to `{addr}`",
                                timeout.as_secs(),
                                missing.join(", ")
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(lost(0, &e)),
                }
            }
            slots.into_iter().flatten().collect()
        } else {
            let start = Instant::now();
            let mut s = loop {
                match TcpStream::connect(&addr) {
                    Ok(s) => break s,
                    Err(e) if start.elapsed() > timeout => {
                        return Err(Error::InvalidArgument(format!(
                            "rank {} could not reach rank 0 at `{addr}` in {}s: {e}",
                            world.rank,
                            timeout.as_secs()
                        )));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            s.set_read_timeout(Some(timeout)).map_err(|e| lost(0, &e))?;
            s.set_nodelay(true).map_err(|e| lost(0, &e))?;
            let mut hello = HELLO.to_vec();
            hello.extend((world.rank as u32).to_le_bytes());
            hello.extend((world.size as u32).to_le_bytes());
            send(&mut s, 0, Op::Hello, &hello)?;
            vec![s]
        };
        Ok(Self {
            rank: world.rank,
            size: world.size,
            peers: Mutex::new(peers),
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.size
    }

    /// `buf` becomes the sum of every rank's `buf` (same length on every rank), added in rank
    /// order at rank 0.
    pub fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let bytes = buf.len() * 4;
        if self.rank == 0 {
            for (i, s) in peers.iter_mut().enumerate() {
                let got = recv(s, i + 1, Op::Sum, bytes)?;
                if got.len() != bytes {
                    return Err(Error::InvalidArgument(format!(
                        "rank {} sent {} values where rank 0 has {}: do all ranks train the same model?",
                        i + 1,
                        got.len() / 4,
                        buf.len()
                    )));
                }
                for (x, c) in buf.iter_mut().zip(got.chunks_exact(4)) {
                    *x += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            let out: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
            for (i, s) in peers.iter_mut().enumerate() {
                send(s, i + 1, Op::Sum, &out)?;
            }
        } else {
            let s = &mut peers[0];
            let out: Vec<u8> = buf.iter().flat_map(|x| x.to_le_bytes()).collect();
            send(s, 0, Op::Sum, &out)?;
            let got = recv(s, 0, Op::Sum, bytes)?;
            for (x, c) in buf.iter_mut().zip(got.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
    }

    /// Rank 0's `bytes` on every rank (at most 1 MiB).
    pub fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let mut peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.rank == 0 {
            for (i, s) in peers.iter_mut().enumerate() {
                send(s, i + 1, Op::Broadcast, bytes)?;
            }
        } else {
            *bytes = recv(&mut peers[0], 0, Op::Broadcast, 1 << 20)?;
        }
        Ok(())
    }

    /// Whether any rank's `flag` is set (all ranks get the same answer).
    pub fn any(&self, flag: bool) -> Result<bool> {
        let mut v = [f32::from(u8::from(flag))];
        self.all_reduce_sum(&mut v)?;
        Ok(v[0] > 0.0)
    }
}

fn parse_hello(b: &[u8]) -> Result<(usize, usize)> {
    if b.len() != 12 || &b[..4] != HELLO {
        return Err(Error::InvalidArgument(
            "something that is not a qscript rank connected to `MASTER_PORT`".into(),
        ));
    }
    let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
    Ok((word(4), word(8)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn world(rank: usize, size: usize, port: u16) -> World {
        World {
            rank,
            size,
            local_rank: rank,
            local_size: size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Three ranks as threads: every rank gets the same sum; a rank that goes away is named by
    /// the one that waits for it.
    #[test]
    fn ranks_sum_buffers_and_a_lost_rank_is_named() {
        let port = free_port();
        let t = Duration::from_secs(20);
        let handles: Vec<_> = (0..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let g = Group::connect(&world(r, 3, port), t).unwrap();
                    let mut buf = vec![r as f32, 1.0, 10.0 * r as f32];
                    g.all_reduce_sum(&mut buf).unwrap();
                    assert!(g.any(r == 2).unwrap());
                    let mut b = if r == 0 { b"id".to_vec() } else { Vec::new() };
                    g.broadcast(&mut b).unwrap();
                    assert_eq!(b, b"id");
                    assert!(!g.any(false).unwrap());
                    (buf, g)
                })
            })
            .collect();
        let mut groups = Vec::new();
        for h in handles {
            let (buf, g) = h.join().unwrap();
            assert_eq!(buf, [3.0, 3.0, 30.0]);
            groups.push(g);
        }
        // Rank 2 goes away; rank 0's next sum names it (rank 1 joins the sum as usual).
        let g2 = groups.pop().unwrap();
        drop(g2);
        let g1 = groups.pop().unwrap();
        let one = std::thread::spawn(move || {
            let mut b = [1.0f32];
            g1.all_reduce_sum(&mut b)
        });
        let e = groups[0]
            .all_reduce_sum(&mut [1.0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank 2 closed its connection"), "{e}");
        drop(groups);
        let e1 = one.join().unwrap().unwrap_err().to_string();
        assert!(e1.contains("rank 0"), "{e1}");
    }

    /// A rank that makes another call than the others is told the ranks are out of step.
    #[test]
    fn ranks_out_of_step_are_told_so() {
        let port = free_port();
        let t = Duration::from_secs(20);
        let one = std::thread::spawn(move || {
            let g = Group::connect(&world(1, 2, port), t).unwrap();
            g.all_reduce_sum(&mut [1.0]).unwrap_err().to_string()
        });
        let g = Group::connect(&world(0, 2, port), t).unwrap();
        g.broadcast(&mut b"id".to_vec()).unwrap();
        let e = one.join().unwrap();
        assert!(
            e.contains("out of step: rank 0 sent a broadcast where a sum was due"),
            "{e}"
        );
    }
}
