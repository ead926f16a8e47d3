//! A bounded byte reader, as rustls' `codec::Reader`: `sub(len)` gives a nested structure its own
//! reader that cannot read past its parent's window, and every read returns `None` instead of
//! panicking when the bytes run out.

#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.left() {
            return None;
        }
        let r = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Some(r)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    /// A reader over the next `n` bytes, which this reader skips.
    pub(crate) fn sub(&mut self, n: usize) -> Option<Reader<'a>> {
        self.take(n).map(Reader::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded() {
        let mut r = Reader::new(&[1, 2, 3, 4, 5]);
        assert_eq!(r.u8(), Some(1));
        let mut s = r.sub(2).unwrap();
        assert_eq!(s.u16(), Some(0x0203));
        assert_eq!(s.u8(), None);
        assert_eq!(r.left(), 2);
        assert_eq!(r.u32(), None);
        assert_eq!(r.u16(), Some(0x0405));
        assert_eq!(r.left(), 0);
        assert!(r.sub(1).is_none());
    }
}
