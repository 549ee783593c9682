//! Framing: a 4-byte big-endian length prefix followed by that many bytes.
//!
//! Parsing is separate from I/O: [`split_records`] checks and splits a batch
//! frame already in memory. A peer that announces a frame above the limit is
//! refused before any of it is buffered.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::FrameError;

/// Writes one frame (length prefix + body).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    body: &[u8],
    max_frame_bytes: usize,
) -> Result<(), FrameError> {
    if body.len() > max_frame_bytes {
        return Err(FrameError::TooLarge {
            bytes: body.len() as u64,
            max_bytes: max_frame_bytes as u64,
        });
    }
    writer.write_all(&(body.len() as u32).to_be_bytes()).await?;
    writer.write_all(body).await?;
    Ok(())
}

/// Reads one frame into `buf` (replacing its content). Returns `Ok(false)` on a
/// clean end of stream before any byte of a new frame.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max_frame_bytes: usize,
) -> Result<bool, FrameError> {
    let mut len_bytes = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = reader.read(&mut len_bytes[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(false)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge {
            bytes: len as u64,
            max_bytes: max_frame_bytes as u64,
        });
    }
    // Grow the buffer as bytes arrive rather than trusting the announced
    // length: a peer announcing many large frames and sending nothing must
    // not make us allocate them.
    buf.clear();
    (&mut *reader).take(len as u64).read_to_end(buf).await?;
    if buf.len() < len {
        return Err(FrameError::Truncated);
    }
    Ok(true)
}

/// Appends one record (`u32` BE length + bytes) to a batch frame body.
pub fn push_record(body: &mut Vec<u8>, record: &[u8]) {
    body.extend_from_slice(&(record.len() as u32).to_be_bytes());
    body.extend_from_slice(record);
}

/// Splits a batch frame body into its records, refusing truncated ones.
pub fn split_records(mut body: &[u8]) -> Result<Vec<&[u8]>, FrameError> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 4 {
            return Err(FrameError::Malformed(
                "record length prefix cut short".into(),
            ));
        }
        let len = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
        body = &body[4..];
        if len > body.len() {
            return Err(FrameError::Malformed(format!(
                "record of {len} bytes but only {} left in frame",
                body.len()
            )));
        }
        out.push(&body[..len]);
        body = &body[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_truncation_is_refused() {
        let mut body = Vec::new();
        push_record(&mut body, b"abc");
        push_record(&mut body, b"");
        push_record(&mut body, b"hello");
        let recs = split_records(&body).unwrap();
        assert_eq!(recs, vec![&b"abc"[..], &b""[..], &b"hello"[..]]);
        assert!(split_records(&body[..body.len() - 1]).is_err());
        assert!(split_records(&body[..2]).is_err());
    }

    #[tokio::test]
    async fn frames_enforce_the_size_limit() {
        let mut wire = Vec::new();
        write_frame(&mut wire, b"0123456789", 16).await.unwrap();
        let mut buf = Vec::new();
        assert!(read_frame(&mut &wire[..], &mut buf, 16).await.unwrap());
        assert_eq!(buf, b"0123456789");
        assert!(matches!(
            read_frame(&mut &wire[..], &mut buf, 5).await,
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            read_frame(&mut &wire[..7], &mut buf, 16).await,
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut &wire[..2], &mut buf, 16).await,
            Err(FrameError::Truncated)
        ));
        assert!(!read_frame(&mut &b""[..], &mut buf, 16).await.unwrap());
    }
}
