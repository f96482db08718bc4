//! Request bodies of streamed parts: a part's UploadPart request starts with its first byte and
//! its body is fed chunk by chunk as the upload receives them ([`PartFeed`]); the chunks stay
//! referenced (not copied) until S3 has the part, so a failed streamed attempt can be sent again
//! from them ([`KeptChunks`]).

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

/// The body of a part's streamed attempt: the chunks the writer sends, `length` bytes in all.
/// If the writer goes away before sending them all, the body fails (a short part must not
/// look complete to S3).
///
/// The channel is unbounded on purpose: what waits in it are references to the chunks the part
/// keeps anyway (reserved in the memory budget, at most one part), so a bound would add no
/// safety, only couple the receiving stream to the S3 socket chunk by chunk. Back-pressure stays
/// at part granularity (`uploads.parts_in_flight`).
pub(super) struct PartFeed {
    chunks: mpsc::UnboundedReceiver<Bytes>,
    remaining: u64,
}

impl PartFeed {
    pub(super) fn new(length: u64) -> (mpsc::UnboundedSender<Bytes>, Self) {
        let (sender, chunks) = mpsc::unbounded_channel();
        (
            sender,
            Self {
                chunks,
                remaining: length,
            },
        )
    }
}

/// The writer abandoned the part before its last byte.
#[derive(Debug, thiserror::Error)]
#[error("the part's bytes stopped {remaining} bytes short of its length")]
pub(super) struct PartCutShort {
    remaining: u64,
}

impl Body for PartFeed {
    type Data = Bytes;
    type Error = PartCutShort;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, PartCutShort>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        match self.chunks.poll_recv(context) {
            Poll::Ready(Some(chunk)) => {
                self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(None) => Poll::Ready(Some(Err(PartCutShort {
                remaining: self.remaining,
            }))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// A complete part's chunks, as a body that can be built again for every attempt.
#[derive(Clone)]
pub(super) struct KeptChunks {
    chunks: VecDeque<Bytes>,
    remaining: u64,
}

impl KeptChunks {
    pub(super) fn new(chunks: Vec<Bytes>) -> Self {
        let remaining = chunks.iter().map(|chunk| chunk.len() as u64).sum();
        Self {
            chunks: chunks.into(),
            remaining,
        }
    }
}

impl Body for KeptChunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.chunks.pop_front().map(|chunk| {
            self.remaining -= chunk.len() as u64;
            Ok(Frame::data(chunk))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    async fn next(body: &mut (impl Body<Data = Bytes> + Unpin)) -> Option<Result<Bytes, String>> {
        poll_fn(|context| Pin::new(&mut *body).poll_frame(context))
            .await
            .map(|frame| match frame {
                Ok(frame) => Ok(frame.into_data().unwrap_or_default()),
                Err(_) => Err("failed".to_owned()),
            })
    }

    #[tokio::test]
    async fn a_fed_part_ends_after_its_length_and_fails_when_cut_short() {
        let (sender, mut body) = PartFeed::new(5);
        assert_eq!(body.size_hint().exact(), Some(5));
        sender.send(Bytes::from_static(b"abc")).unwrap();
        sender.send(Bytes::from_static(b"de")).unwrap();
        assert_eq!(next(&mut body).await, Some(Ok(Bytes::from_static(b"abc"))));
        assert_eq!(next(&mut body).await, Some(Ok(Bytes::from_static(b"de"))));
        assert!(body.is_end_stream());
        assert_eq!(next(&mut body).await, None);

        let (sender, mut body) = PartFeed::new(5);
        sender.send(Bytes::from_static(b"abc")).unwrap();
        drop(sender);
        assert_eq!(next(&mut body).await, Some(Ok(Bytes::from_static(b"abc"))));
        assert_eq!(next(&mut body).await, Some(Err("failed".to_owned())));
    }

    #[tokio::test]
    async fn kept_chunks_replay_the_same_bytes_every_time() {
        let kept = KeptChunks::new(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"c")]);
        for _ in 0..2 {
            let mut body = kept.clone();
            assert_eq!(body.size_hint().exact(), Some(3));
            assert_eq!(next(&mut body).await, Some(Ok(Bytes::from_static(b"ab"))));
            assert_eq!(next(&mut body).await, Some(Ok(Bytes::from_static(b"c"))));
            assert_eq!(next(&mut body).await, None);
        }
    }
}
