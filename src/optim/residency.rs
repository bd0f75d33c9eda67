//! Which pages sit in which of a fixed number of frames, evicting the least recently used:
//! the bookkeeping of a paged store whose frames are somewhere else (device memory, for
//! [`CudaPageStore`](super::cuda_page_store)), kept apart so it is tested without a GPU.

use std::collections::BTreeMap;

/// What to do to bring a page into a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The frame the page now occupies.
    pub frame: usize,
    /// A page that had to leave that frame, and whether its frame content must be written back
    /// (it changed since it was loaded).
    pub evicted: Option<(usize, bool)>,
    /// The frame must be filled from the page's backing copy (false: it was already resident).
    pub load: bool,
}

/// Page → frame map with an LRU order over `frames` frames.
#[derive(Debug, Default)]
pub struct Residency {
    frames: usize,
    /// Per frame: the page in it and whether the frame is newer than the backing copy.
    occupant: Vec<Option<(usize, bool)>>,
    /// Page → frame, for resident pages.
    frame_of: BTreeMap<usize, usize>,
    /// Tick of last use → frame.
    lru: BTreeMap<u64, usize>,
    last_use: Vec<u64>,
    tick: u64,
}

impl Residency {
    /// `frames` frames, all empty.
    pub fn new(frames: usize) -> Self {
        Self {
            frames,
            occupant: vec![None; frames],
            last_use: vec![0; frames],
            ..Self::default()
        }
    }

    /// The frame holding `page`, if resident.
    pub fn frame_of(&self, page: usize) -> Option<usize> {
        self.frame_of.get(&page).copied()
    }

    /// Number of frames in use.
    pub fn resident(&self) -> usize {
        self.frame_of.len()
    }

    fn touch(&mut self, frame: usize) {
        self.lru.remove(&self.last_use[frame]);
        self.tick += 1;
        self.last_use[frame] = self.tick;
        self.lru.insert(self.tick, frame);
    }

    /// Bring `page` into a frame without evicting any page of `keep` (the pages in use now).
    /// `None` when every frame holds a page of `keep`.
    pub fn place(&mut self, page: usize, keep: &[usize]) -> Option<Placement> {
        if let Some(frame) = self.frame_of(page) {
            self.touch(frame);
            return Some(Placement {
                frame,
                evicted: None,
                load: false,
            });
        }
        let frame = match self.occupant.iter().position(Option::is_none) {
            Some(free) => free,
            None => *self
                .lru
                .values()
                .find(|&&f| self.occupant[f].is_some_and(|(p, _)| !keep.contains(&p)))?,
        };
        let evicted = self.occupant[frame].take();
        if let Some((old, _)) = evicted {
            self.frame_of.remove(&old);
        }
        self.occupant[frame] = Some((page, false));
        self.frame_of.insert(page, frame);
        self.touch(frame);
        Some(Placement {
            frame,
            evicted,
            load: true,
        })
    }

    /// Place `page` only if a frame is free (for prefetching: never evicts).
    pub fn place_if_free(&mut self, page: usize) -> Option<Placement> {
        if self.frame_of(page).is_some() || self.occupant.iter().all(Option::is_some) {
            return None;
        }
        self.place(page, &[])
    }

    /// Mark `page`'s frame as newer than its backing copy (`true`) or equal to it (`false`).
    pub fn set_dirty(&mut self, page: usize, dirty: bool) {
        if let Some(f) = self.frame_of(page) {
            if let Some((_, d)) = self.occupant[f].as_mut() {
                *d = dirty;
            }
        }
    }

    /// Whether `page` is resident and newer than its backing copy.
    pub fn is_dirty(&self, page: usize) -> bool {
        self.frame_of(page)
            .and_then(|f| self.occupant[f])
            .is_some_and(|(_, d)| d)
    }

    /// Forget `page`'s frame (the backing copy is about to change); returns the frame and whether
    /// it must be written back first.
    pub fn release(&mut self, page: usize) -> Option<(usize, bool)> {
        let frame = self.frame_of.remove(&page)?;
        self.lru.remove(&self.last_use[frame]);
        let dirty = self.occupant[frame].take().is_some_and(|(_, d)| d);
        Some((frame, dirty))
    }

    /// Number of frames.
    pub fn frames(&self) -> usize {
        self.frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_free_frames_then_evicts_least_recently_used() {
        let mut r = Residency::new(2);
        assert_eq!(r.place(10, &[]).unwrap().evicted, None);
        assert_eq!(r.place(11, &[]).unwrap().evicted, None);
        assert!(!r.place(10, &[]).unwrap().load); // hit, and 10 is now the most recent
        r.set_dirty(11, true);
        assert!(r.is_dirty(11));
        let p = r.place(12, &[]).unwrap();
        assert_eq!(p.evicted, Some((11, true)));
        assert!(p.load);
        assert_eq!(r.frame_of(11), None);
        assert_eq!(r.resident(), 2);
    }

    #[test]
    fn never_evicts_a_page_in_use() {
        let mut r = Residency::new(2);
        r.place(1, &[]);
        r.place(2, &[]);
        assert_eq!(r.place(3, &[1, 2]), None);
        let p = r.place(3, &[2]).unwrap();
        assert_eq!(p.evicted, Some((1, false)));
        assert_eq!(r.place_if_free(4), None);
    }

    #[test]
    fn release_reports_dirty_and_frees_the_frame() {
        let mut r = Residency::new(1);
        r.place(5, &[]);
        r.set_dirty(5, true);
        r.set_dirty(5, false);
        assert!(!r.is_dirty(5));
        r.set_dirty(5, true);
        assert_eq!(r.release(5), Some((0, true)));
        assert_eq!(r.release(5), None);
        assert_eq!(r.place_if_free(6).unwrap().frame, 0);
    }

    #[test]
    fn lru_order_follows_use_over_a_long_sequence() {
        let frames = 3;
        let mut r = Residency::new(frames);
        let mut model: Vec<usize> = Vec::new(); // most recent last
        for step in 0..200usize {
            let page = (step * 7 + step / 3) % 5;
            let p = r.place(page, &[]).unwrap();
            if let Some(i) = model.iter().position(|&q| q == page) {
                assert!(!p.load);
                model.remove(i);
            } else {
                assert!(p.load);
                if model.len() == frames {
                    let lru = model.remove(0);
                    assert_eq!(p.evicted.map(|(q, _)| q), Some(lru));
                }
            }
            model.push(page);
            assert!(r.resident() <= frames);
        }
    }
}
