//! Unit tests of `io/remote/client/link.rs`, in a file of their own to keep that one short.

use std::collections::BTreeMap;

use super::super::{detached, Outcome};
use super::*;

/// Cookie 0 reads 1 KiB at 4096, cookie 1 writes.
const REQUESTS: [(Command, u64, u32); 2] = [(Command::Read, 4096, 1024), (Command::Write, 0, 512)];
/// The read buffer's old contents (another volume's plaintext).
const OLD: u8 = 0xa5;

fn simple(error: u32, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn chunk(done: bool, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn data(done: bool, cookie: u64, offset: u64, bytes: &[u8]) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(bytes);
    chunk(done, REPLY_TYPE_OFFSET_DATA, cookie, &payload)
}

fn hole(done: bool, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut payload = offset.to_be_bytes().to_vec();
    payload.extend_from_slice(&len.to_be_bytes());
    chunk(done, REPLY_TYPE_OFFSET_HOLE, cookie, &payload)
}

fn none_done(cookie: u64) -> Vec<u8> {
    chunk(true, REPLY_TYPE_NONE, cookie, &[])
}

/// Feeds `stream` (structured replies negotiated or not) until it ends
/// or breaks; returns how it ended (the end of input is an EOF) and
/// the outcome per cookie.
fn feed(structured: bool, stream: &[u8]) -> (io::Error, BTreeMap<u64, Outcome>) {
    let (shared, outcomes) = detached(structured, &REQUESTS, OLD);
    let mut r = stream;
    let end = loop {
        if let Err(e) = read_reply(&shared, &mut r, structured) {
            break e;
        }
    };
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    (end, outcomes)
}

fn framed(end: &io::Error) -> bool {
    end.kind() == io::ErrorKind::UnexpectedEof
}

fn eio() -> Outcome {
    Err(Some(EIO as i32))
}

/// The write's simple reply after `stream`: still parsed means the
/// stream stayed framed and the connection up.
fn then_write_reply(mut stream: Vec<u8>) -> Vec<u8> {
    stream.extend(simple(0, 1, &[]));
    stream
}

#[test]
fn none_and_done_for_a_read_is_eio() {
    let (end, out) = feed(true, &then_write_reply(none_done(0)));
    assert!(framed(&end), "{end}");
    assert_eq!(out[&0], eio());
    assert_eq!(out[&1], Ok(vec![]));
}

#[test]
fn short_coverage_is_eio() {
    let mut s = data(false, 0, 4096, &[1; 512]);
    s.extend(hole(false, 0, 4096 + 512, 500));
    s.extend(none_done(0));
    let (end, out) = feed(true, &then_write_reply(s));
    assert!(framed(&end), "{end}");
    assert_eq!(out[&0], eio());
    assert_eq!(out[&1], Ok(vec![]));
    // The same, ended by the last data chunk.
    let (_, out) = feed(true, &data(true, 0, 4096 + 24, &[1; 1000]));
    assert_eq!(out[&0], eio());
}

#[test]
fn overlapping_chunks_are_eio() {
    let mut s = data(false, 0, 4096, &[1; 600]);
    s.extend(data(true, 0, 4096 + 500, &[2; 524]));
    let (end, out) = feed(true, &then_write_reply(s));
    assert!(framed(&end), "{end}");
    assert_eq!(out[&0], eio());
    // A hole over data, and data over a hole.
    let mut s = data(false, 0, 4096, &[1; 1024]);
    s.extend(hole(true, 0, 4096 + 1000, 24));
    assert_eq!(feed(true, &s).1[&0], eio());
    let mut s = hole(false, 0, 4096, 1024);
    s.extend(data(true, 0, 4096, &[1; 1]));
    assert_eq!(feed(true, &s).1[&0], eio());
}

#[test]
fn chunks_outside_the_request_are_eio() {
    for s in [
        // Before, straddling the end, far past it, wrapping around.
        data(true, 0, 0, &[1; 1024]),
        data(true, 0, 4096 + 1, &[1; 1024]),
        hole(true, 0, 1 << 40, 1024),
        hole(true, 0, u64::MAX - 10, 1024),
        hole(true, 0, 4096, u32::MAX),
    ] {
        let (end, out) = feed(true, &then_write_reply(s));
        assert!(framed(&end), "{end}");
        assert_eq!(out[&0], eio());
        assert_eq!(out[&1], Ok(vec![]));
    }
}

#[test]
fn a_data_chunk_longer_than_the_request_is_a_protocol_error() {
    // Its length is all the framing there is: nothing to skip safely,
    // and nothing is allocated from it.
    let mut s = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    s.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    s.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    s.extend_from_slice(&0u64.to_be_bytes());
    s.extend_from_slice(&(1024u32 + 9).to_be_bytes());
    let (end, out) = feed(true, &s);
    assert_eq!(end.kind(), io::ErrorKind::InvalidData, "{end}");
    assert!(out.is_empty());
}

#[test]
fn malformed_but_framed_chunks_are_eio() {
    for s in [
        // A NONE chunk with a payload; data too short for its offset;
        // a hole chunk of the wrong size; empty data and hole.
        chunk(true, REPLY_TYPE_NONE, 0, &[0; 4]),
        chunk(true, REPLY_TYPE_OFFSET_DATA, 0, &[0; 4]),
        chunk(true, REPLY_TYPE_OFFSET_HOLE, 0, &[0; 16]),
        data(true, 0, 4096, &[]),
        hole(true, 0, 4096, 0),
    ] {
        let (end, out) = feed(true, &then_write_reply(s));
        assert!(framed(&end), "{end}");
        assert_eq!(out[&0], eio());
        assert_eq!(out[&1], Ok(vec![]));
    }
}

#[test]
fn structured_replies_not_negotiated_are_a_protocol_error() {
    let (end, out) = feed(false, &data(true, 0, 4096, &[1; 1024]));
    assert_eq!(end.kind(), io::ErrorKind::InvalidData, "{end}");
    assert!(out.is_empty());
    // Simple replies are what such a connection gets.
    let (end, out) = feed(false, &simple(0, 0, &[7; 1024]));
    assert!(framed(&end), "{end}");
    assert_eq!(out[&0], Ok(vec![7; 1024]));
}

#[test]
fn an_unknown_cookie_is_a_protocol_error() {
    for s in [
        simple(0, 99, &[]),
        none_done(99),
        data(true, 99, 4096, &[1; 1024]),
    ] {
        let (end, out) = feed(true, &s);
        assert_eq!(end.kind(), io::ErrorKind::InvalidData, "{end}");
        assert!(out.is_empty());
    }
}

#[test]
fn read_data_for_a_write_is_a_protocol_error() {
    for s in [data(true, 1, 0, &[1; 512]), hole(true, 1, 0, 512)] {
        let (end, _) = feed(true, &s);
        assert_eq!(end.kind(), io::ErrorKind::InvalidData, "{end}");
    }
}

#[test]
fn data_and_holes_in_any_order_give_the_exact_bytes() {
    let bytes: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8 + 1).collect();
    let mut want = vec![0u8; 1024];
    want[100..400].copy_from_slice(&bytes);
    want[900..].fill(9);
    // Interleaved with the write's reply, out of order, DONE on NONE.
    let mut s = hole(false, 0, 4096 + 400, 500);
    s.extend(simple(0, 1, &[]));
    s.extend(data(false, 0, 4096 + 900, &[9; 124]));
    s.extend(data(false, 0, 4096 + 100, &bytes));
    s.extend(hole(false, 0, 4096, 100));
    s.extend(none_done(0));
    let (end, out) = feed(true, &s);
    assert!(framed(&end), "{end}");
    assert_eq!(out[&0], Ok(want.clone()));
    assert_eq!(out[&1], Ok(vec![]));
    // DONE on the last data chunk.
    let mut s = data(false, 0, 4096, &want[..512]);
    s.extend(data(true, 0, 4096 + 512, &want[512..]));
    assert_eq!(feed(true, &s).1[&0], Ok(want));
    // A whole hole reads as zeros, not as the buffer's old contents.
    assert_eq!(
        feed(true, &hole(true, 0, 4096, 1024)).1[&0],
        Ok(vec![0; 1024])
    );
}

#[test]
fn error_chunks_fail_the_request_with_their_code() {
    let mut payload = 28u32.to_be_bytes().to_vec(); // ENOSPC
    payload.extend_from_slice(&2u16.to_be_bytes());
    payload.extend_from_slice(b"no");
    let mut s = data(false, 0, 4096, &[1; 1024]);
    s.extend(chunk(false, REPLY_TYPE_ERROR, 0, &payload));
    s.extend(none_done(0));
    let (end, out) = feed(true, &then_write_reply(s));
    assert!(framed(&end), "{end}");
    assert_eq!(out[&0], Err(Some(28)));
    // A simple error reply too.
    assert_eq!(feed(true, &simple(5, 0, &[])).1[&0], eio());
}
