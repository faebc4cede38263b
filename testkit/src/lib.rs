//! Helpers for the unit tests of the workspace's crates; a dev-dependency only, never
//! part of the server's build.

#![forbid(unsafe_code)]

use rand::Rng;

/// Fragments that make parsers take unusual paths: markup delimiters, entities,
/// declarations, a NUL and invalid UTF-8.
const TOKENS: &[&[u8]] = &[
    b"<",
    b">",
    b"'",
    b"\"",
    b"&",
    b"&amp;",
    b"&#0;",
    b"]]>",
    b"<!--",
    b"<?",
    b"<!DOCTYPE",
    b"xmlns:a='x'",
    b"\0",
    b"\xff\xfe",
    b"=",
    b"/>",
    b"</",
    b"a:b",
];

/// Mutates `input` the way a fuzzer would (property tests on stable, STYLE 12):
/// flipped, inserted, deleted and duplicated bytes, tokens spliced in, truncation.
pub fn mutate(input: &[u8], rng: &mut impl Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.gen_range(1..8) {
        let at = rng.gen_range(0..=out.len());
        match rng.gen_range(0..6) {
            0 if !out.is_empty() => {
                let i = rng.gen_range(0..out.len());
                out[i] ^= 1 << rng.gen_range(0..8);
            }
            1 => out.insert(at, rng.r#gen()),
            2 if at < out.len() => {
                let end = rng.gen_range(at..=out.len().min(at + 16));
                out.drain(at..end);
            }
            3 if at < out.len() => {
                let end = rng.gen_range(at..=out.len().min(at + 32));
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
            4 => {
                let token = TOKENS[rng.gen_range(0..TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            _ => out.truncate(at),
        }
    }
    out
}
