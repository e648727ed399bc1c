//! Proptest strategies shared by the property tests of several crates.

use proptest::prelude::*;
use proptest::sample::Index;

/// `text` with one to four edits: a character set, inserted or removed, or a truncation. Each
/// new character is drawn from `pieces`, a regex of one-character alternatives (for URLs, say,
/// their separators beside printable ASCII), so that edits of a valid input reach the parser's
/// deeper branches that arbitrary text rarely does.
pub fn edited(text: String, pieces: &'static str) -> impl Strategy<Value = String> {
    proptest::collection::vec((0..4u8, any::<Index>(), pieces), 1..5).prop_map(move |edits| {
        let mut chars: Vec<char> = text.chars().collect();
        for (operation, at, piece) in edits {
            let len = chars.len();
            let piece = piece.chars().next().unwrap_or('x');
            match operation {
                0 if len > 0 => chars[at.index(len)] = piece,
                1 => chars.insert(at.index(len + 1), piece),
                2 if len > 0 => {
                    chars.remove(at.index(len));
                }
                3 => chars.truncate(at.index(len + 1)),
                _ => {}
            }
        }
        chars.into_iter().collect()
    })
}
