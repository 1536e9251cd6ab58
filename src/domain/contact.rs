//! Contacts: an email address (parsed by lettre) or an E.164 phone number.

use super::DomainError;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// An email address lettre accepts, stored lower-cased so one mailbox is one subscriber.
///
/// Lower-casing the local part is technically lossy (RFC 5321 lets it be case-sensitive), but no
/// mail provider in practice treats `Ann@` and `ann@` as different people, and subscribing twice
/// would send two copies of every update.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EmailAddress(lettre::Address);

impl EmailAddress {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let normalized = input.trim().to_lowercase();
        let invalid = |reason: String| DomainError::InvalidEmail {
            input: input.to_owned(),
            reason,
        };
        if normalized.len() > 254 {
            return Err(invalid("it is longer than 254 characters".into()));
        }
        let address = lettre::Address::from_str(&normalized).map_err(|e| invalid(e.to_string()))?;
        if !address.domain().contains('.') && address.domain() != "localhost" {
            return Err(invalid("the domain has no dot".into()));
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

/// A phone number in E.164 form, validated against the numbering plan of its country.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let invalid = |reason: &str| DomainError::InvalidPhone {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let compact: String = input
            .trim()
            .chars()
            .filter(|c| !matches!(c, ' ' | '-' | '(' | ')' | '.'))
            .collect();
        if !compact.starts_with('+') {
            return Err(invalid("it must start with + and the country code"));
        }
        let parsed = phonenumber::parse(None, &compact).map_err(|e| invalid(&e.to_string()))?;
        if !has_possible_length(&parsed) {
            return Err(invalid("it has the wrong number of digits for its country"));
        }
        Ok(Self(
            parsed.format().mode(phonenumber::Mode::E164).to_string(),
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
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

/// Where a subscriber is reached. Its canonical string is also its key in the store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Contact {
    Email(EmailAddress),
    Phone(PhoneNumber),
}

impl Contact {
    /// Parses either form: a leading `+` means a phone number.
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        if input.trim_start().starts_with('+') {
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
    use super::*;

    #[test]
    fn an_email_address_is_trimmed_and_lower_cased() {
        let contact = Contact::parse("  Ann@Example.COM ").unwrap();
        assert_eq!(contact.as_str(), "ann@example.com");
        assert_eq!(contact.kind(), ContactKind::Email);
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

    #[test]
    fn a_phone_number_is_normalized_to_e164() {
        let contact = Contact::parse("+44 7700 900123").unwrap();
        assert_eq!(contact.as_str(), "+447700900123");
        assert_eq!(contact.kind(), ContactKind::Phone);
    }

    #[test]
    fn malformed_phone_numbers_are_rejected() {
        for bad in ["+44", "+4477009001234567", "+999123", "+44abc"] {
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
}
