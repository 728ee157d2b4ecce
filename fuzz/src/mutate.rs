//! Byte-level mutation: bit and byte flips, inserts, deletes, repeats of a chunk, splices of two
//! inputs, interesting integers (as text and as little-endian bytes) and dictionary tokens; and
//! the choice, per input, between these, the structure-aware JSON mutator and the safetensors
//! generator.

use rand::Rng;
use rand::rngs::StdRng;

use crate::interesting::INTERESTING;
use crate::targets::{Shape, Target};

/// Number spellings only text formats have.
const NUMBER_TEXT: &[&str] = &[
    "NaN",
    "Infinity",
    "-Infinity",
    "1e308",
    "1e309",
    "-1e309",
    "5e-324",
    "1e-400",
    "-0",
    "0.5",
    "-0.0",
    "1e999999999",
    "0x10",
    "1_000",
];

/// A mutation of `input`: 1 to 4 stacked byte mutations, drawing splice partners from
/// `corpus` and tokens from `target.dict`; at most `target.max_len` bytes.
pub fn bytes(rng: &mut StdRng, input: &[u8], corpus: &[Vec<u8>], target: &Target) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        one(rng, &mut out, corpus, target);
        out.truncate(target.max_len);
    }
    out
}

/// A random position in `v` (`0..=len`).
fn pos(rng: &mut StdRng, v: &[u8]) -> usize {
    rng.random_range(0..=v.len())
}

/// A random chunk `[a, b)` of `v`, mostly short.
fn chunk(rng: &mut StdRng, v: &[u8]) -> (usize, usize) {
    let a = pos(rng, v);
    let max = (v.len() - a).min(if rng.random_bool(0.8) { 16 } else { 4096 });
    (a, a + rng.random_range(0..=max))
}

/// One mutation of `v` in place.
fn one(rng: &mut StdRng, v: &mut Vec<u8>, corpus: &[Vec<u8>], target: &Target) {
    match rng.random_range(0..12) {
        0 if !v.is_empty() => {
            let i = rng.random_range(0..v.len());
            v[i] ^= 1 << rng.random_range(0..8);
        }
        1 if !v.is_empty() => {
            let i = rng.random_range(0..v.len());
            v[i] = rng.random();
        }
        2 => {
            let at = pos(rng, v);
            let n = rng.random_range(1..=8);
            let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            v.splice(at..at, junk);
        }
        3 => {
            let (a, b) = chunk(rng, v);
            v.drain(a..b);
        }
        4 => {
            // A chunk repeated: long names, many tokens, deep nesting of `[`.
            let (a, b) = chunk(rng, v);
            let piece = if a == b {
                vec![*b"[{\"(".get(rng.random_range(0..4)).unwrap_or(&b'[')]
            } else {
                v[a..b].to_vec()
            };
            let room = target.max_len.saturating_sub(v.len()) / piece.len().max(1);
            let times = rng.random_range(1..=room.clamp(1, 10_000));
            let rep: Vec<u8> = piece
                .iter()
                .copied()
                .cycle()
                .take(piece.len() * times)
                .collect();
            v.splice(b..b, rep);
        }
        5 if !corpus.is_empty() => {
            // A splice: our head, another input's tail.
            let other = &corpus[rng.random_range(0..corpus.len())];
            let a = pos(rng, v);
            let b = rng.random_range(0..=other.len());
            v.truncate(a);
            v.extend_from_slice(&other[b..]);
        }
        6 => {
            // An interesting integer, as text, over a run of digits or at a random place.
            let n = INTERESTING[rng.random_range(0..INTERESTING.len())];
            let text = if rng.random_bool(0.8) {
                n.to_string()
            } else {
                NUMBER_TEXT[rng.random_range(0..NUMBER_TEXT.len())].to_string()
            };
            let (a, b) = digits_near(v, pos(rng, v));
            v.splice(a..b, text.into_bytes());
        }
        7 if target.shape == Shape::Safetensors || rng.random_bool(0.2) => {
            // An interesting integer as little-endian bytes (the header length, a value).
            let n = INTERESTING[rng.random_range(0..INTERESTING.len())] as u64;
            let width = [1, 2, 4, 8][rng.random_range(0..4)];
            let at = if rng.random_bool(0.3) { 0 } else { pos(rng, v) };
            let end = (at + width).min(v.len());
            v.splice(at..end, n.to_le_bytes()[..width].iter().copied());
        }
        8 | 9 if !target.dict.is_empty() => {
            let tok = target.dict[rng.random_range(0..target.dict.len())].as_bytes();
            let at = pos(rng, v);
            if rng.random_bool(0.5) {
                v.splice(at..at, tok.iter().copied());
            } else {
                let end = (at + tok.len()).min(v.len());
                v.splice(at..end, tok.iter().copied());
            }
        }
        10 if !v.is_empty() => {
            // Swap two chunks' order by moving one.
            let (a, b) = chunk(rng, v);
            let piece: Vec<u8> = v.drain(a..b).collect();
            let at = pos(rng, v);
            v.splice(at..at, piece);
        }
        _ => {
            // Truncate: a file cut short.
            let at = pos(rng, v);
            v.truncate(at);
        }
    }
}

/// The run of ASCII digits (with a sign) around `at`, or the empty range at `at`.
fn digits_near(v: &[u8], at: usize) -> (usize, usize) {
    let is_num = |c: u8| c.is_ascii_digit() || c == b'-' || c == b'.' || c == b'e';
    let mut a = at;
    while a > 0 && is_num(v[a - 1]) {
        a -= 1;
    }
    let mut b = at;
    while b < v.len() && is_num(v[b]) {
        b += 1;
    }
    (a, b)
}

/// A line-level mutation (recipes, YAML, templates, text): a line repeated, dropped, moved,
/// or taken from another input.
pub fn lines(rng: &mut StdRng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let split =
        |b: &[u8]| -> Vec<Vec<u8>> { b.split(|&c| c == b'\n').map(<[u8]>::to_vec).collect() };
    let mut ls = split(input);
    for _ in 0..rng.random_range(1..=3) {
        let i = rng.random_range(0..ls.len().max(1));
        match rng.random_range(0..4) {
            0 if !ls.is_empty() => {
                let l = ls[i].clone();
                let n = rng.random_range(1..=50);
                ls.splice(i..i, std::iter::repeat_n(l, n));
            }
            1 if ls.len() > 1 => {
                ls.remove(i);
            }
            2 if !ls.is_empty() => {
                let l = ls.remove(i);
                let j = rng.random_range(0..=ls.len());
                ls.insert(j, l);
            }
            _ if !corpus.is_empty() => {
                let other = split(&corpus[rng.random_range(0..corpus.len())]);
                let l = other[rng.random_range(0..other.len())].clone();
                ls.insert(i.min(ls.len()), l);
            }
            _ => {}
        }
    }
    ls.join(&b'\n')
}

/// The next input for `target`: a fresh one from the safetensors generator, a structure-aware
/// JSON mutation, or byte mutations of a corpus input, by chance.
pub fn next(rng: &mut StdRng, corpus: &[Vec<u8>], target: &Target) -> Vec<u8> {
    let base: &[u8] = if corpus.is_empty() {
        &[]
    } else {
        &corpus[rng.random_range(0..corpus.len())]
    };
    let out = match target.shape {
        Shape::Plain if rng.random_bool(0.3) => lines(rng, base, corpus),
        Shape::Safetensors if rng.random_bool(0.3) => crate::synth::safetensors(rng, corpus),
        Shape::Json if rng.random_bool(0.5) => crate::json::mutate(rng, base, target)
            .unwrap_or_else(|| bytes(rng, base, corpus, target)),
        _ => bytes(rng, base, corpus, target),
    };
    let mut out = out;
    out.truncate(target.max_len);
    out
}
