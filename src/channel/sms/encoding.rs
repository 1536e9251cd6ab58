//! SMS encodings and segments: whether a text fits the GSM 03.38 7-bit alphabet, what it costs
//! in that alphabet or in UCS-2, and into how many segments a handset receives it.
//!
//! The rules are the ones gateways (Twilio, Kannel) apply: GSM-7 when every character is in the
//! default alphabet or its extension table (the extension characters cost two septets, an
//! escape and the character), else UCS-2, counted in UTF-16 code units. One message carries
//! 160 septets or 70 units; a longer text is split into segments of 153 septets or 67 units,
//! the rest of each segment holding the header that joins them again. A segment never ends
//! between the two septets of an extension character or the two halves of a surrogate pair,
//! so a text may need one segment more than its length divided by the segment size.

/// How an SMS is encoded on the air.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The GSM 03.38 default alphabet, seven bits a character.
    Gsm7,
    /// UTF-16 code units, for any text outside that alphabet.
    Ucs2,
}

impl Encoding {
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Gsm7 => "GSM-7",
            Encoding::Ucs2 => "UCS-2",
        }
    }

    /// The most a single, unsplit message carries.
    pub fn single_limit(self) -> usize {
        match self {
            Encoding::Gsm7 => 160,
            Encoding::Ucs2 => 70,
        }
    }

    /// What each segment of a split message carries, the concatenation header aside.
    pub fn segment_limit(self) -> usize {
        match self {
            Encoding::Gsm7 => 153,
            Encoding::Ucs2 => 67,
        }
    }

    /// The most `segments` segments carry in this encoding.
    pub fn capacity(self, segments: usize) -> usize {
        if segments <= 1 {
            self.single_limit()
        } else {
            self.segment_limit() * segments
        }
    }
}

/// A text's encoding, its length in that encoding's units, and its segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measured {
    pub encoding: Encoding,
    /// Septets in GSM-7, UTF-16 code units in UCS-2.
    pub units: usize,
    pub segments: usize,
}

/// The GSM 03.38 default alphabet, in code order (0x1B, the escape, left out): one septet each.
const GSM7_BASIC: &str = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?\
                          ¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà";

/// The extension table a handset shows: an escape septet and the character, two septets each.
const GSM7_EXTENSION: &str = "\u{0C}^{}\\[~]|€";

/// What `c` costs in GSM-7, or `None` when the alphabet has no such character.
pub fn gsm7_septets(c: char) -> Option<usize> {
    if GSM7_BASIC.contains(c) {
        Some(1)
    } else if GSM7_EXTENSION.contains(c) {
        Some(2)
    } else {
        None
    }
}

/// Whether every character of `text` is in the GSM-7 alphabet or its extension table.
pub fn is_gsm7(text: &str) -> bool {
    text.chars().all(|c| gsm7_septets(c).is_some())
}

/// The encoding a gateway picks for `text`, its length and its segments.
pub fn measure(text: &str) -> Measured {
    let gsm7: Option<Vec<usize>> = text.chars().map(gsm7_septets).collect();
    let (encoding, costs) = match gsm7 {
        Some(costs) => (Encoding::Gsm7, costs),
        None => (
            Encoding::Ucs2,
            text.chars().map(char::len_utf16).collect::<Vec<_>>(),
        ),
    };
    let units = costs.iter().sum();
    let segments = if units <= encoding.single_limit() {
        1
    } else {
        segments_of(&costs, encoding.segment_limit())
    };
    Measured {
        encoding,
        units,
        segments,
    }
}

/// Packs characters of the given costs into segments of `per_segment` units, never splitting
/// one character across two segments.
fn segments_of(costs: &[usize], per_segment: usize) -> usize {
    let mut segments = 1;
    let mut used = 0;
    for &cost in costs {
        if used + cost > per_segment {
            segments += 1;
            used = 0;
        }
        used += cost;
    }
    segments
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_text_is_one_gsm7_segment() {
        let measured = measure("");
        assert_eq!(measured.encoding, Encoding::Gsm7);
        assert_eq!((measured.units, measured.segments), (0, 1));
    }

    #[test]
    fn one_hundred_and_sixty_gsm7_characters_are_one_segment_and_one_more_makes_two() {
        assert_eq!(measure(&"a".repeat(160)).segments, 1);
        let over = measure(&"a".repeat(161));
        assert_eq!(
            (over.encoding, over.units, over.segments),
            (Encoding::Gsm7, 161, 2)
        );
    }

    #[test]
    fn three_full_gsm7_segments_hold_459_characters_and_460_need_a_fourth() {
        assert_eq!(measure(&"a".repeat(306)).segments, 2);
        assert_eq!(measure(&"a".repeat(307)).segments, 3);
        assert_eq!(measure(&"a".repeat(459)).segments, 3);
        assert_eq!(measure(&"a".repeat(460)).segments, 4);
    }

    #[test]
    fn every_extension_character_costs_two_septets() {
        for c in ['€', '[', ']', '{', '}', '^', '~', '\\', '|', '\u{0C}'] {
            let measured = measure(&c.to_string());
            assert_eq!(measured.encoding, Encoding::Gsm7, "{c:?}");
            assert_eq!(measured.units, 2, "{c:?}");
        }
        let text = format!("{}€", "a".repeat(158));
        assert_eq!(measure(&text).units, 160);
        assert_eq!(measure(&text).segments, 1);
        let text = format!("{}€", "a".repeat(159));
        assert_eq!((measure(&text).units, measure(&text).segments), (161, 2));
    }

    #[test]
    fn the_default_alphabet_stays_gsm7_with_one_septet_each() {
        let text = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./:;<=>?¡ÄÖÑÜ§¿äöñüà";
        let measured = measure(text);
        assert_eq!(measured.encoding, Encoding::Gsm7);
        assert_eq!(measured.units, text.chars().count());
    }

    #[test]
    fn a_character_outside_the_alphabet_forces_ucs2() {
        for text in [
            "Sorry – we're late",
            "It’s fixed",
            "ça va",
            "`code`",
            "日本",
            "🙂",
        ] {
            assert_eq!(measure(text).encoding, Encoding::Ucs2, "{text}");
        }
    }

    #[test]
    fn ucs2_counts_utf16_units_with_70_in_one_message_and_67_per_segment() {
        let text = format!("{}🙂", "a".repeat(68));
        let measured = measure(&text);
        assert_eq!(
            (measured.encoding, measured.units, measured.segments),
            (Encoding::Ucs2, 70, 1)
        );
        let text = format!("{}🙂", "a".repeat(69));
        assert_eq!((measure(&text).units, measure(&text).segments), (71, 2));
        assert_eq!(measure(&format!("{}é", "ж".repeat(133))).segments, 2);
        assert_eq!(measure(&"ж".repeat(134)).segments, 2);
        assert_eq!(measure(&"ж".repeat(135)).segments, 3);
    }

    #[test]
    fn a_segment_never_splits_an_escape_or_a_surrogate_pair() {
        // 152 septets, then a two-septet character that does not fit in the first segment.
        let text = format!("{}€{}", "a".repeat(152), "a".repeat(152));
        let measured = measure(&text);
        assert_eq!(measured.units, 306);
        assert_eq!(
            measured.segments, 3,
            "306 septets, yet the € moves to the second"
        );
        let text = format!("{}🙂{}", "ж".repeat(66), "ж".repeat(66));
        assert_eq!(measure(&text).units, 134);
        assert_eq!(measure(&text).segments, 3);
    }

    #[test]
    fn capacity_is_the_single_limit_for_one_segment_and_the_segment_limit_times_n_beyond() {
        assert_eq!(Encoding::Gsm7.capacity(1), 160);
        assert_eq!(Encoding::Gsm7.capacity(3), 459);
        assert_eq!(Encoding::Ucs2.capacity(1), 70);
        assert_eq!(Encoding::Ucs2.capacity(3), 201);
    }
}
