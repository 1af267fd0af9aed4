use std::pin::Pin;
use std::task::{Context, Poll};

use super::*;
use shoal_protocol::message::MAX_CHUNK_FRAME_BYTES;

/// A reader that yields `data` (at most `piece` bytes a read), then never anything more.
struct Stalling {
    data: Vec<u8>,
    pos: usize,
    piece: usize,
}

impl Stalling {
    fn new(data: Vec<u8>, piece: usize) -> Stalling {
        Stalling {
            data,
            pos: 0,
            piece,
        }
    }
}

impl AsyncRead for Stalling {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let left = self.data.len() - self.pos;
        if left == 0 {
            return Poll::Pending;
        }
        let n = left.min(buf.len()).min(self.piece);
        let pos = self.pos;
        buf[..n].copy_from_slice(&self.data[pos..pos + n]);
        self.pos += n;
        Poll::Ready(Ok(n))
    }
}

fn header(len: u32) -> Vec<u8> {
    len.to_be_bytes().to_vec()
}

fn budget() -> Arc<Semaphore> {
    Arc::new(Semaphore::new(FRAME_MEMORY_BYTES))
}

#[tokio::test]
async fn a_frame_over_the_expected_limit_is_refused_before_its_payload_is_read() {
    let claimed = 4 * 1024 * 1024;
    let mut data = header(claimed);
    data.extend_from_slice(&[7; 16]);
    let mut io = Stalling::new(data, usize::MAX);
    let budget = budget();
    let e = read_frame_within(&mut io, MAX_CHUNK_FRAME_BYTES, &budget, payload_deadline)
        .await
        .expect_err("a 4 MiB chunk request");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
    assert!(FrameError::is_too_large(&e), "{e:?}");
    assert_eq!(
        io.pos,
        codec::FRAME_HEADER_BYTES,
        "nothing after the header was read"
    );
    assert_eq!(budget.available_permits(), FRAME_MEMORY_BYTES);
    // A sync request has its own limit, well under the largest frame.
    let mut io = Stalling::new(header(MAX_SYNC_REQUEST_BYTES as u32 + 1), usize::MAX);
    let e = read_frame_within(&mut io, MAX_SYNC_REQUEST_BYTES, &budget, payload_deadline)
        .await
        .expect_err("an oversized sync request");
    assert!(FrameError::is_too_large(&e));
}

#[tokio::test]
async fn a_stalled_frame_holds_only_the_bytes_that_arrived() {
    let claimed = codec::MAX_FRAME_BYTES as u32;
    let mut data = header(claimed);
    data.extend_from_slice(&[1; 1000]);
    let mut io = Stalling::new(data, usize::MAX);
    let budget = budget();
    let mut read = Box::pin(read_frame_within(
        &mut io,
        codec::MAX_FRAME_BYTES,
        &budget,
        payload_deadline,
    ));
    assert!(futures::poll!(read.as_mut()).is_pending());
    let taken = FRAME_MEMORY_BYTES - budget.available_permits();
    assert!(
        taken <= READ_PIECE_BYTES,
        "{taken} bytes held for a frame that sent 1000 of its {claimed}"
    );
    drop(read);
    assert_eq!(budget.available_permits(), FRAME_MEMORY_BYTES, "given back");
}

#[tokio::test]
async fn a_frame_arriving_in_small_pieces_is_read_whole_and_its_budget_given_back() {
    let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
    let mut data = header(payload.len() as u32);
    data.extend_from_slice(&payload);
    let mut io = Stalling::new(data, 1500);
    let budget = budget();
    let read = read_frame_within(&mut io, codec::MAX_FRAME_BYTES, &budget, payload_deadline)
        .await
        .unwrap();
    assert_eq!(read, payload);
    assert_eq!(budget.available_permits(), FRAME_MEMORY_BYTES);
}

#[tokio::test]
async fn a_frame_waits_while_the_budget_is_spent() {
    let mut data = header(10);
    data.extend_from_slice(&[3; 10]);
    let mut io = Stalling::new(data, usize::MAX);
    let budget = Arc::new(Semaphore::new(5));
    let mut read = Box::pin(read_frame_within(
        &mut io,
        codec::MAX_FRAME_BYTES,
        &budget,
        payload_deadline,
    ));
    assert!(
        futures::poll!(read.as_mut()).is_pending(),
        "5 bytes of budget for 10"
    );
    budget.add_permits(5);
    assert_eq!(read.await.unwrap(), vec![3; 10]);
}

#[tokio::test]
async fn a_frame_that_trickles_past_its_deadline_is_cut_off() {
    let mut data = header(100);
    data.extend_from_slice(&[1; 10]);
    let mut io = Stalling::new(data, usize::MAX);
    let e = read_frame_within(&mut io, 4096, &budget(), |_| Duration::from_millis(50))
        .await
        .expect_err("trickled");
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
}

#[test]
fn a_payload_deadline_grows_with_its_length() {
    assert_eq!(payload_deadline(0), PAYLOAD_BASE_TIME);
    assert_eq!(
        payload_deadline(codec::MAX_FRAME_BYTES),
        PAYLOAD_BASE_TIME + Duration::from_secs(64)
    );
}

#[test]
fn a_buffer_doubles_up_to_the_payload_length() {
    assert_eq!(grown_capacity(0, 100, 1000), 100);
    assert_eq!(grown_capacity(100, 150, 1000), 200);
    assert_eq!(grown_capacity(600, 700, 1000), 1000);
    assert_eq!(grown_capacity(0, 10, 10), 10);
}
