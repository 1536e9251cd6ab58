//! Contacts: an email address (parsed by lettre) or an E.164 phone number.

use super::DomainError;
use super::update::{describe_char, printable};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// An email address an SMTP envelope can carry to any server, stored lower-cased so one
/// mailbox is one subscriber.
///
/// That is an unquoted ASCII local part and a domain name, not an IP literal. The domain is
/// kept in its IDNA ASCII form, so `bücher.de` and `xn--bcher-kva.de` are one subscriber and
/// a mail server that predates IDNA can still be handed the address.
///
/// Lower-casing the local part is technically lossy (RFC 5321 lets it be case-sensitive), but no
/// mail provider in practice treats `Ann@` and `ann@` as different people, and subscribing twice
/// would send two copies of every update.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EmailAddress(lettre::Address);

impl EmailAddress {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let invalid = |reason: String| DomainError::InvalidEmail {
            input: printable(input),
            reason,
        };
        let Some((local_part, domain)) = input.trim().rsplit_once('@') else {
            return Err(invalid("it has no @".into()));
        };
        let local_part = smtp_local_part(local_part).map_err(invalid)?;
        let domain = smtp_domain(domain).map_err(invalid)?;
        let address =
            lettre::Address::new(local_part, domain).map_err(|e| invalid(e.to_string()))?;
        // Measured on the ASCII form, which is what the envelope carries.
        let ascii: &str = address.as_ref();
        if ascii.len() > 254 {
            return Err(invalid("it is longer than 254 characters".into()));
        }
        Ok(Self(address))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }

    pub fn address(&self) -> &lettre::Address {
        &self.0
    }
}

/// The local part, lower-cased, if it is a dot-atom of ASCII: what any SMTP server takes.
fn smtp_local_part(local_part: &str) -> Result<String, String> {
    if local_part.is_empty() {
        return Err("there is nothing before the @".into());
    }
    if local_part.starts_with('"') {
        let reason = "its local part is quoted (\"…\"@), which many mail systems mishandle; \
                      use an address without quotes";
        return Err(reason.into());
    }
    // Checked before lower-casing: Unicode lower-casing would turn the Kelvin sign into k.
    if let Some(c) = local_part.chars().find(|c| !c.is_ascii()) {
        return Err(format!(
            "its local part contains {}, and a non-ASCII local part needs SMTPUTF8, \
             which most mail servers cannot take",
            describe_char(c)
        ));
    }
    if let Some(c) = local_part.chars().find(|&c| !(is_atext(c) || c == '.')) {
        return Err(format!(
            "its local part contains {}, which an address can only have in quotes",
            describe_char(c)
        ));
    }
    if local_part.split('.').any(str::is_empty) {
        return Err("its local part starts or ends with a dot, or has two in a row".into());
    }
    if local_part.len() > 64 {
        return Err("its local part is longer than 64 characters".into());
    }
    Ok(local_part.to_ascii_lowercase())
}

/// RFC 5322 atext in ASCII: the characters a local part may have without quotes.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c)
}

/// The domain in its IDNA ASCII form, lower-cased, if it is a host name DNS can resolve.
fn smtp_domain(domain: &str) -> Result<String, String> {
    if domain.is_empty() {
        return Err("there is nothing after the @".into());
    }
    if domain.starts_with('[') {
        return Err(
            "its domain is an IP address in brackets; crier sends to domain names only".into(),
        );
    }
    if let Some(c) = domain
        .chars()
        .find(|&c| c.is_ascii() && !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
    {
        return Err(format!(
            "its domain contains {}, which a domain name cannot have",
            describe_char(c)
        ));
    }
    // STD3 rules keep to letters, digits and hyphens, as RFC 5321 does, and the DNS length
    // check keeps labels to 63 characters and the name to 253.
    let ascii = idna::uts46::Uts46::new()
        .to_ascii(
            domain.as_bytes(),
            idna::uts46::AsciiDenyList::STD3,
            idna::uts46::Hyphens::CheckFirstLast,
            idna::uts46::DnsLength::Verify,
        )
        .map_err(|_| {
            "its domain is not a valid domain name: it needs labels of letters, digits and \
             inner hyphens, each 1 to 63 characters long, between single dots"
                .to_owned()
        })?;
    let top_level = ascii.rsplit('.').next().unwrap_or_default();
    if top_level.bytes().all(|b| b.is_ascii_digit()) {
        let reason = "its domain ends in a number, like an IP address; \
                      crier sends to domain names only";
        return Err(reason.into());
    }
    if !ascii.contains('.') && ascii != "localhost" {
        return Err("the domain has no dot".into());
    }
    Ok(ascii.into_owned())
}

/// A phone number in E.164 form, validated against the numbering plan of its country.
///
/// Only ASCII digits, with spaces, dashes, dots, slashes and brackets between them, are read:
/// the phonenumber crate would also turn letters into digits (+1 800 FLOWERS) and drop an
/// extension without a word, and neither reaches a phone by text message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhoneNumber(String);

/// The most digits an international (E.164) number has, country code included.
const E164_MOST_DIGITS: usize = 15;

impl PhoneNumber {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let invalid = |reason: String| DomainError::InvalidPhone {
            input: printable(input),
            reason,
        };
        let Some(rest) = input.trim().strip_prefix('+') else {
            return Err(invalid("it must start with + and the country code".into()));
        };
        let compact: String = rest
            .chars()
            .filter(|c| {
                !matches!(
                    c,
                    ' ' | '\u{a0}' | '\u{2009}' | '\u{202f}' | '-' | '.' | '/'
                )
            })
            .collect();
        // "(0)" is the trunk prefix, dialled only from inside the country: "+44 (0) 7700 900123"
        // is the common UK way of writing +44 7700 900123.
        let compact = compact.replacen("(0)", "", 1);
        let mut e164 = String::from("+");
        for (index, c) in compact.char_indices() {
            match c {
                '0'..='9' => e164.push(c),
                '(' | ')' => {}
                _ => return Err(invalid(not_a_digit(&compact[index..], c))),
            }
        }
        let parsed = phonenumber::parse(None, &e164).map_err(|e| invalid(e.to_string()))?;
        if !has_possible_length(&parsed) {
            return Err(invalid(
                "it has the wrong number of digits for its country".into(),
            ));
        }
        let e164 = parsed.format().mode(phonenumber::Mode::E164).to_string();
        // The library drops leading zeros after some country codes as a trunk prefix, even
        // zeros that were the number itself ("+49 000001" becomes "+490001"). What is stored
        // must read back as itself, or the stored contact could never be read.
        let reads_back = phonenumber::parse(None, &e164).is_ok_and(|again| {
            has_possible_length(&again)
                && again.format().mode(phonenumber::Mode::E164).to_string() == e164
        });
        if !reads_back {
            return Err(invalid(
                "it has the wrong number of digits for its country".into(),
            ));
        }
        // Some countries' plans allow national numbers too long for the international format.
        if e164.len() - 1 > E164_MOST_DIGITS {
            return Err(invalid(format!(
                "it has more than {E164_MOST_DIGITS} digits, the most an international number has"
            )));
        }
        Ok(Self(e164))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The number's region as an ISO 3166 code (`GB`, `US`): the region whose numbering plan
    /// holds it, or else the main region of its country code, as libphonenumber reads a
    /// number outside every assigned range. `None` for a code no region owns (+800 freephone).
    pub fn region(&self) -> Option<String> {
        let parsed = phonenumber::parse(None, &self.0).ok()?;
        if let Some(id) = parsed.country().id() {
            return Some(id.as_ref().to_owned());
        }
        let regions = phonenumber::metadata::DATABASE.by_code(&parsed.code().value())?;
        regions
            .iter()
            .find(|region| region.is_main_country_for_code())
            .or(regions.first())
            .map(|region| region.id().to_owned())
            .filter(|id| Self::is_region(id))
    }

    /// Whether `code` names a region of the numbering plans (`GB`, `US`), in capitals.
    pub fn is_region(code: &str) -> bool {
        code.parse::<phonenumber::country::Id>().is_ok()
    }
}

/// Why `rest`, which starts with the character `c` where a digit should be, is no phone number.
fn not_a_digit(rest: &str, c: char) -> String {
    // The ways an extension is written: ext. 5, extension 5, x5, #5, ;ext=5 (RFC 3966), and the
    // comma a dialler reads as "pause, then dial 5".
    let extension = matches!(c, 'x' | 'X' | '#' | ';' | ',')
        || rest
            .get(..3)
            .is_some_and(|start| start.eq_ignore_ascii_case("ext"));
    if extension {
        "it has an extension, and a text message cannot reach an extension".into()
    } else if c.is_alphabetic() {
        "it contains letters; write the number in digits".into()
    } else {
        format!("it contains {} where a digit should be", describe_char(c))
    }
}

/// Whether the national number has a length its country's numbering plan allows.
///
/// This is deliberately looser than `phonenumber::is_valid`, which also demands an assigned
/// range: ranges reserved for drama and testing (the UK's 07700 900xxx) fail that, and the
/// SMS gateway is the authority on whether a number exists. Length catches the typos.
fn has_possible_length(number: &phonenumber::PhoneNumber) -> bool {
    let digits = number.national().to_string().len() as u16;
    let Some(plans) = phonenumber::metadata::DATABASE.by_code(&number.code().value()) else {
        return false;
    };
    plans.iter().any(|plan| {
        let kinds = plan.descriptors();
        // The general descriptor's lengths are often left empty in the metadata; the lengths
        // of the kinds of number (mobile, fixed line…) are the ones filled in.
        [
            Some(kinds.general()),
            kinds.mobile(),
            kinds.fixed_line(),
            kinds.toll_free(),
            kinds.premium_rate(),
            kinds.shared_cost(),
            kinds.personal_number(),
            kinds.voip(),
            kinds.pager(),
            kinds.uan(),
        ]
        .into_iter()
        .flatten()
        .any(|kind| kind.possible_length().contains(&digits))
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactKind {
    Email,
    Phone,
}

impl ContactKind {
    /// What one message to a contact of this kind is called: "email", "text".
    pub fn message_noun(self, count: u64) -> &'static str {
        match (self, count) {
            (ContactKind::Email, 1) => "email",
            (ContactKind::Email, _) => "emails",
            (ContactKind::Phone, 1) => "text",
            (ContactKind::Phone, _) => "texts",
        }
    }
}

/// Where a subscriber is reached. Its canonical string is also its key in the store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Contact {
    Email(EmailAddress),
    Phone(PhoneNumber),
}

impl Contact {
    /// The contact as shown to support and on pages: `a***@example.com`, `+44*******123`.
    /// Enough to recognise one's own, not enough to learn someone else's.
    pub fn masked(&self) -> String {
        match self {
            Contact::Email(email) => {
                let text = email.as_str();
                let (local, domain) = text.split_once('@').unwrap_or((text, ""));
                let first: String = local.chars().take(1).collect();
                format!("{first}***@{domain}")
            }
            Contact::Phone(phone) => {
                let digits: Vec<char> = phone.as_str().chars().collect();
                let keep_start = 3.min(digits.len());
                let keep_end = 3.min(digits.len().saturating_sub(keep_start));
                let hidden = digits.len() - keep_start - keep_end;
                let start: String = digits[..keep_start].iter().collect();
                let end: String = digits[digits.len() - keep_end..].iter().collect();
                format!("{start}{}{end}", "*".repeat(hidden))
            }
        }
    }

    /// Parses either form: an `@` means an email address, else a leading `+` a phone number.
    ///
    /// The `@` is looked at first because a local part may start with `+`, and every stored
    /// email contact has to parse back to itself when the store reads it.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        if !input.contains('@') && input.trim_start().starts_with('+') {
            PhoneNumber::parse(input).map(Contact::Phone)
        } else {
            EmailAddress::parse(input).map(Contact::Email)
        }
    }

    pub fn kind(&self) -> ContactKind {
        match self {
            Contact::Email(_) => ContactKind::Email,
            Contact::Phone(_) => ContactKind::Phone,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Contact::Email(email) => email.as_str(),
            Contact::Phone(phone) => phone.as_str(),
        }
    }

    pub fn email(&self) -> Option<&EmailAddress> {
        match self {
            Contact::Email(email) => Some(email),
            Contact::Phone(_) => None,
        }
    }
}

impl fmt::Display for Contact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Contact {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Contact {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Contact::parse(&raw).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::super::update::hostile;
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_number_is_stored_only_if_it_reads_back_as_itself() {
        // The trunk prefix written the common way is dropped, as people mean it.
        assert_eq!(
            PhoneNumber::parse("+44 (0) 7700 900123").map(|p| p.as_str().to_owned()),
            Ok("+447700900123".to_owned())
        );
        // Zeros that were the number: what is left is too short to be one (found by the
        // property test below).
        assert!(matches!(
            PhoneNumber::parse("+49000001"),
            Err(DomainError::InvalidPhone { .. })
        ));
        // Possible in Germany's plan, but longer than any international number.
        assert!(matches!(
            PhoneNumber::parse("+49100000077007700"),
            Err(DomainError::InvalidPhone { .. })
        ));
    }

    #[test]
    fn a_number_s_region_comes_from_its_numbering_plan() {
        let region = |n: &str| PhoneNumber::parse(n).unwrap().region();
        assert_eq!(region("+447700900123").as_deref(), Some("GB"));
        assert_eq!(region("+44 1481 256789").as_deref(), Some("GG"));
        assert_eq!(region("+1 416 555 0123").as_deref(), Some("CA"));
        assert_eq!(region("+1 201 555 0123").as_deref(), Some("US"));
        assert_eq!(region("+33 6 12 34 56 78").as_deref(), Some("FR"));
        assert!(PhoneNumber::is_region("IE"));
        assert!(!PhoneNumber::is_region("UK"));
    }

    #[test]
    fn a_contact_is_masked_for_pages_and_support() {
        assert_eq!(
            Contact::parse("ann@example.com").unwrap().masked(),
            "a***@example.com"
        );
        assert_eq!(
            Contact::parse("+447700900123").unwrap().masked(),
            "+44*******123"
        );
    }

    #[test]
    fn an_email_address_is_trimmed_and_lower_cased() {
        let contact = Contact::parse("  Ann@Example.COM ").unwrap();
        assert_eq!(contact.as_str(), "ann@example.com");
        assert_eq!(contact.kind(), ContactKind::Email);
    }

    #[test]
    fn an_email_address_that_starts_with_a_plus_is_still_an_email_address() {
        let email = EmailAddress::parse("+ann@example.com").unwrap();
        let contact = Contact::parse("+ann@example.com").unwrap();
        assert_eq!(contact, Contact::Email(email));
        let stored = serde_json::to_string(&contact).unwrap();
        assert_eq!(serde_json::from_str::<Contact>(&stored).unwrap(), contact);
    }

    #[test]
    fn malformed_email_addresses_are_rejected() {
        for bad in [
            "ann",
            "ann@",
            "@example.com",
            "ann@@example.com",
            "Ann <ann@example.com>",
            "ann@example",
        ] {
            assert!(
                matches!(
                    EmailAddress::parse(bad),
                    Err(DomainError::InvalidEmail { .. })
                ),
                "{bad}"
            );
        }
    }

    fn email_reason(input: &str) -> String {
        match EmailAddress::parse(input) {
            Err(DomainError::InvalidEmail { reason, .. }) => reason,
            other => panic!("{input}: {other:?}"),
        }
    }

    #[test]
    fn an_internationalised_domain_is_stored_in_its_ascii_form() {
        let ascii = EmailAddress::parse("user@xn--bcher-kva.de").unwrap();
        assert_eq!(ascii.as_str(), "user@xn--bcher-kva.de");
        for written in ["user@bücher.de", "User@BÜCHER.de", "user@xn--BCHER-KVA.de"] {
            assert_eq!(
                EmailAddress::parse(written).as_ref(),
                Ok(&ascii),
                "{written}"
            );
        }
    }

    #[test]
    fn a_quoted_local_part_is_refused() {
        let err = EmailAddress::parse("\"john doe\"@example.com").unwrap_err();
        assert_eq!(
            err.to_string(),
            "'\"john doe\"@example.com' is not an email address: its local part is quoted \
             (\"…\"@), which many mail systems mishandle; use an address without quotes"
        );
    }

    #[test]
    fn an_ip_address_is_refused_as_a_domain() {
        for written in ["a@[127.0.0.1]", "a@[IPv6:::1]", "a@[::1]"] {
            assert_eq!(
                email_reason(written),
                "its domain is an IP address in brackets; crier sends to domain names only",
                "{written}"
            );
        }
        for written in ["a@127.0.0.1", "a@example.123"] {
            assert!(
                email_reason(written).starts_with("its domain ends in a number"),
                "{written}"
            );
        }
    }

    #[test]
    fn a_non_ascii_local_part_is_refused_as_it_needs_smtputf8() {
        assert_eq!(
            email_reason("josé@example.com"),
            "its local part contains 'é' (U+00E9), and a non-ASCII local part needs SMTPUTF8, \
             which most mail servers cannot take"
        );
        // Unicode lower-casing would have made this kim@example.com.
        assert!(email_reason("\u{212A}im@example.com").contains("SMTPUTF8"));
    }

    #[test]
    fn a_domain_an_smtp_envelope_cannot_carry_is_refused() {
        for written in [
            "ann@exa_mple.com",
            "ann@ex!ample.com",
            "ann@-example.com",
            "ann@example-.com",
            "ann@example.com.",
            "ann@example..com",
            "ann@exam\u{1b}ple.com",
            "ann@example.c\u{fffe}om",
            &format!("ann@{}.com", "a".repeat(64)),
        ] {
            assert!(
                matches!(
                    EmailAddress::parse(written),
                    Err(DomainError::InvalidEmail { .. })
                ),
                "{written}"
            );
        }
    }

    #[test]
    fn an_address_over_254_characters_is_refused() {
        let domain = format!(
            "{}.{}.{}.com",
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(57)
        );
        let longest = format!("{}@{domain}", "a".repeat(64));
        assert_eq!(longest.len(), 254);
        assert!(EmailAddress::parse(&longest).is_ok());
        let over = format!("{}@e.{domain}", "a".repeat(64));
        assert_eq!(email_reason(&over), "it is longer than 254 characters");
    }

    #[test]
    fn a_phone_number_is_normalized_to_e164() {
        let contact = Contact::parse("+44 7700 900123").unwrap();
        assert_eq!(contact.as_str(), "+447700900123");
        assert_eq!(contact.kind(), ContactKind::Phone);
    }

    #[test]
    fn a_uk_number_written_with_its_trunk_prefix_in_brackets_is_accepted() {
        for written in [
            "+44 (0) 7700 900123",
            "+44(0)7700900123",
            "+44 (0)7700-900-123",
            "+44 ( 0 ) 7700 900123",
        ] {
            assert_eq!(
                PhoneNumber::parse(written).map(|p| p.as_str().to_owned()),
                Ok("+447700900123".to_owned()),
                "{written}"
            );
        }
    }

    fn reason(input: &str) -> String {
        match PhoneNumber::parse(input) {
            Err(DomainError::InvalidPhone { reason, .. }) => reason,
            other => panic!("{input}: {other:?}"),
        }
    }

    #[test]
    fn a_number_with_an_extension_is_refused_as_a_text_cannot_reach_it() {
        for written in [
            "+44 7700 900123 ext. 5",
            "+44 7700 900123 EXT 5",
            "+44 7700 900123 extension 5",
            "+44 7700 900123 x5",
            "+44 7700 900123 X 5",
            "+44 7700 900123;ext=5",
            "+44 7700 900123 #5",
            "+44 7700 900123,5",
        ] {
            assert_eq!(
                reason(written),
                "it has an extension, and a text message cannot reach an extension",
                "{written}"
            );
        }
    }

    #[test]
    fn letters_in_a_phone_number_are_refused() {
        for written in ["+1 800 FLOWERS", "+44 7700 9OO123", "+44a7700900123"] {
            assert_eq!(
                reason(written),
                "it contains letters; write the number in digits",
                "{written}"
            );
        }
    }

    #[test]
    fn a_phone_number_is_read_in_ascii_digits_only() {
        assert_eq!(
            reason("+44 7700 90012\u{663}"),
            "it contains '\u{663}' (U+0663) where a digit should be"
        );
        assert_eq!(
            reason("+44 7700\x1b900123"),
            "it contains a control character (U+001B) where a digit should be"
        );
        assert_eq!(
            reason("+44 7700 900123 +1"),
            "it contains '+' (U+002B) where a digit should be"
        );
    }

    #[test]
    fn malformed_phone_numbers_are_rejected() {
        let very_long = format!("+44{}", "7".repeat(10_000));
        for bad in [
            "+44",
            "+4477009001234567",
            "+999123",
            "+44abc",
            "+",
            "+()",
            "+0",
            "+00447700900123",
            &very_long,
        ] {
            assert!(
                matches!(
                    PhoneNumber::parse(bad),
                    Err(DomainError::InvalidPhone { .. })
                ),
                "{bad}"
            );
        }
        assert!(PhoneNumber::parse("07700900123").is_err());
    }

    const LOCAL_PARTS: &[&str] = &["ann", "Ann", "+tag", "o'brien", ".", "a", "\"john doe\""];
    const DOMAINS: &[&str] = &[
        "example.com",
        "Example.COM",
        "bücher.de",
        "xn--bcher-kva.de",
        "localhost",
        "[127.0.0.1]",
        "127.0.0.1",
        ".",
        "-",
        "co",
    ];
    const PHONES: &[&str] = &[
        "+44", "+1", " ", "(0)", "(", ")", "7700", "900123", "555", "0", "-", ".", "ext. 5", "x5",
        ";ext=5", "#5", ",",
    ];

    /// Hostile text, or text shaped like an email address with hostile parts.
    fn email_like() -> impl Strategy<Value = String> {
        prop_oneof![
            hostile::text(DOMAINS),
            (hostile::text(LOCAL_PARTS), hostile::text(DOMAINS))
                .prop_map(|(local, domain)| format!("{local}@{domain}")),
        ]
    }

    /// Hostile text, or text shaped like a phone number with hostile parts.
    fn phone_like() -> impl Strategy<Value = String> {
        prop_oneof![
            hostile::text(PHONES),
            (
                "[+](44|1|33|49) ?(\\(0\\))?[0-9 ]{6,14}",
                hostile::text(PHONES)
            )
                .prop_map(|(number, tail)| format!("{number}{tail}")),
        ]
    }

    fn prop_assert_printable(err: &DomainError) -> Result<(), TestCaseError> {
        prop_assert!(!err.to_string().chars().any(char::is_control), "{err:?}");
        Ok(())
    }

    proptest! {
        #![proptest_config(hostile::config())]

        #[test]
        fn a_parsed_email_address_is_ascii_lower_case_and_parses_to_itself(
            input in email_like()
        ) {
            match EmailAddress::parse(&input) {
                Ok(email) => {
                    let text = email.as_str();
                    prop_assert!(text.is_ascii() && text == text.to_ascii_lowercase());
                    prop_assert!(text.len() <= 254);
                    prop_assert!(!text.contains(['"', '[', ']', ' ']));
                    let (local_part, domain) = text.rsplit_once('@').unwrap();
                    prop_assert!(!local_part.is_empty());
                    prop_assert!(domain.contains('.') || domain == "localhost");
                    prop_assert_eq!(EmailAddress::parse(text), Ok(email.clone()));
                    prop_assert_eq!(Contact::parse(text), Ok(Contact::Email(email.clone())));
                }
                Err(err) => {
                    prop_assert!(matches!(err, DomainError::InvalidEmail { .. }), "{err:?}");
                    prop_assert_printable(&err)?;
                }
            }
        }

        #[test]
        fn a_parsed_phone_number_is_e164_and_parses_to_itself(input in phone_like()) {
            match PhoneNumber::parse(&input) {
                Ok(phone) => {
                    let text = phone.as_str();
                    let digits = text.strip_prefix('+').unwrap_or_default();
                    prop_assert!(!digits.is_empty() && digits.len() <= 15);
                    prop_assert!(digits.bytes().all(|b| b.is_ascii_digit()));
                    prop_assert_eq!(PhoneNumber::parse(text), Ok(phone.clone()));
                    prop_assert_eq!(Contact::parse(text), Ok(Contact::Phone(phone.clone())));
                }
                Err(err) => {
                    prop_assert!(matches!(err, DomainError::InvalidPhone { .. }), "{err:?}");
                    prop_assert_printable(&err)?;
                }
            }
        }

        #[test]
        fn a_parsed_contact_survives_the_store(input in prop_oneof![email_like(), phone_like()]) {
            match Contact::parse(&input) {
                Ok(contact) => {
                    prop_assert_eq!(Contact::parse(contact.as_str()), Ok(contact.clone()));
                    let stored = serde_json::to_string(&contact).unwrap();
                    prop_assert_eq!(serde_json::from_str::<Contact>(&stored).unwrap(), contact);
                }
                Err(err) => {
                    prop_assert!(matches!(
                        err,
                        DomainError::InvalidEmail { .. } | DomainError::InvalidPhone { .. }
                    ), "{err:?}");
                    prop_assert_printable(&err)?;
                }
            }
        }
    }
}
