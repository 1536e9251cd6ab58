//! Channel limits: what a channel does with a text over its limit. By default it refuses the
//! update, naming the limit and the measured length; a channel file may set
//! `overflow = "truncate"` to cut the text at a word boundary within the limit and append the
//! status page's link, so the reader can find the rest.

use super::Rejection;
use serde::Deserialize;

/// What to do with a text over the channel's limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Refuse the update (the default: the comms lead shortens it).
    #[default]
    Refuse,
    /// Cut at a word boundary and append the status page's link.
    Truncate,
}

/// How one channel measures a text against its limit.
pub trait Measure {
    /// The text's size in the channel's unit (characters, graphemes, segments…).
    fn measure(&self, text: &str) -> usize;
    /// The most the channel takes.
    fn limit(&self) -> usize;
    /// "characters", "graphemes", "SMS segments"…
    fn unit(&self) -> &str;
}

/// `text` if it fits; else, with [`Overflow::Truncate`], the longest word-boundary prefix that
/// fits with `… {link}` appended; else a rejection naming the limit and the length.
pub fn fit(
    text: &str,
    overflow: Overflow,
    link: &str,
    measure: &dyn Measure,
) -> Result<String, Rejection> {
    fit_with(text, overflow, link, "…", measure)
}

/// [`fit`] with another ellipsis before the link: an SMS in GSM-7 uses `...`, since `…` is
/// not in that alphabet and would force the whole text into UCS-2, less than half the room.
pub fn fit_with(
    text: &str,
    overflow: Overflow,
    link: &str,
    ellipsis: &str,
    measure: &dyn Measure,
) -> Result<String, Rejection> {
    let length = measure.measure(text);
    if length <= measure.limit() {
        return Ok(text.to_owned());
    }
    let refused = || {
        Rejection::OverLimit(format!(
            "the text is {length} {unit}; the limit is {limit} {unit}",
            unit = measure.unit(),
            limit = measure.limit()
        ))
    };
    if overflow == Overflow::Refuse {
        return Err(refused());
    }
    let suffix = format!("{ellipsis} {link}");
    // Word boundaries, longest first; a prefix only shrinks, so the first that fits is best.
    let mut cuts: Vec<usize> = text
        .char_indices()
        .filter(|(_, c)| c.is_whitespace())
        .map(|(at, _)| at)
        .collect();
    cuts.reverse();
    for cut in cuts {
        let candidate = format!("{}{suffix}", text[..cut].trim_end());
        if measure.measure(&candidate) <= measure.limit() {
            return Ok(candidate);
        }
    }
    // Not even the first word fits with the link: the link alone, if it fits.
    let link_only = link.to_owned();
    if measure.measure(&link_only) <= measure.limit() {
        return Ok(link_only);
    }
    Err(refused())
}

/// The preview's figure for a text that fits: "212 of 500 characters".
pub fn figure(text: &str, measure: &dyn Measure) -> super::RenderedPart {
    super::RenderedPart {
        part: "length".into(),
        text: format!(
            "{} of {} {}",
            measure.measure(text),
            measure.limit(),
            measure.unit()
        ),
        format: super::PartFormat::Measure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Chars(usize);

    impl Measure for Chars {
        fn measure(&self, text: &str) -> usize {
            text.chars().count()
        }
        fn limit(&self) -> usize {
            self.0
        }
        fn unit(&self) -> &str {
            "characters"
        }
    }

    #[test]
    fn a_text_at_the_limit_fits_and_one_over_is_refused_with_both_figures() {
        let text = "x".repeat(20);
        assert_eq!(fit(&text, Overflow::Refuse, "L", &Chars(20)).unwrap(), text);
        let over = "x".repeat(21);
        let error = fit(&over, Overflow::Refuse, "L", &Chars(20)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "the text is 21 characters; the limit is 20 characters"
        );
    }

    #[test]
    fn truncation_cuts_at_a_word_and_appends_the_link_within_the_limit() {
        let text = "We are working on it and will write again soon";
        let cut = fit(text, Overflow::Truncate, "https://s.example/", &Chars(40)).unwrap();
        assert_eq!(cut, "We are working on it… https://s.example/");
        assert!(cut.chars().count() <= 40);
    }
}
