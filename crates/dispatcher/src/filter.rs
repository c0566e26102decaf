//! Trigger filters on CloudEvents attributes and extensions, after Knative's trigger
//! filters: `exact`, `prefix` and `suffix` matchers combined with `all`, `any` and
//! `not`.
//!
//! In TOML, a filter is a table whose keys are attribute names (all must match) or the
//! combinators:
//!
//! ```toml
//! filter = { type = { prefix = "com.github." }, source = { exact = "/hooks/github" } }
//! filter = { any = [ { subject = { suffix = ".jpg" } }, { subject = { suffix = ".png" } } ] }
//! filter = { not = { type = { exact = "com.example.ping" } } }
//! ```
//!
//! An attribute the event lacks matches nothing. An empty filter matches everything.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use switchyard_event::Event;

/// How one attribute value is matched.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Matcher {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Matcher {
    fn matches(&self, value: &str) -> bool {
        match self {
            Matcher::Exact(expected) => value == expected,
            Matcher::Prefix(prefix) => value.starts_with(prefix.as_str()),
            Matcher::Suffix(suffix) => value.ends_with(suffix.as_str()),
        }
    }
}

/// A filter expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    Attribute { name: String, matcher: Matcher },
    All(Vec<Filter>),
    Any(Vec<Filter>),
    Not(Box<Filter>),
}

impl Default for Filter {
    fn default() -> Self {
        Filter::All(Vec::new())
    }
}

impl Filter {
    pub fn matches(&self, event: &Event) -> bool {
        match self {
            Filter::Attribute { name, matcher } => event
                .attribute(name)
                .is_some_and(|value| matcher.matches(value)),
            Filter::All(filters) => filters.iter().all(|filter| filter.matches(event)),
            Filter::Any(filters) => filters.iter().any(|filter| filter.matches(event)),
            Filter::Not(filter) => !filter.matches(event),
        }
    }

    /// What the server can filter on: an exact source, and an exact type or a type
    /// prefix, when the filter requires them at its top level.
    pub fn subject_hints(&self) -> SubjectHints<'_> {
        let mut hints = SubjectHints::default();
        let top_level: &[Filter] = match self {
            Filter::All(filters) => filters,
            single => std::slice::from_ref(single),
        };
        for filter in top_level {
            if let Filter::Attribute { name, matcher } = filter {
                match (name.as_str(), matcher) {
                    ("source", Matcher::Exact(source)) => hints.source_exact = Some(source),
                    ("type", Matcher::Exact(ty)) => hints.type_exact = Some(ty),
                    ("type", Matcher::Prefix(prefix)) if hints.type_exact.is_none() => {
                        hints.type_prefix = Some(prefix)
                    }
                    _ => {}
                }
            }
        }
        hints
    }
}

/// Parts of a filter the server can apply through subjects.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SubjectHints<'a> {
    pub source_exact: Option<&'a str>,
    pub type_exact: Option<&'a str>,
    pub type_prefix: Option<&'a str>,
}

impl<'de> Deserialize<'de> for Filter {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(FilterVisitor)
    }
}

struct FilterVisitor;

impl<'de> Visitor<'de> for FilterVisitor {
    type Value = Filter;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a filter table: attribute = { exact | prefix | suffix = \"...\" }, all = [...], any = [...] or not = {...}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Filter, A::Error> {
        let mut filters = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "all" => filters.push(Filter::All(map.next_value()?)),
                "any" => filters.push(Filter::Any(map.next_value()?)),
                "not" => filters.push(Filter::Not(Box::new(map.next_value()?))),
                name => {
                    let valid = !name.is_empty()
                        && name
                            .bytes()
                            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit());
                    if !valid {
                        return Err(de::Error::custom(format!(
                            "`{name}` is not a cloudevents attribute name (lowercase a-z, 0-9) nor all/any/not"
                        )));
                    }
                    filters.push(Filter::Attribute {
                        name: name.to_owned(),
                        matcher: map.next_value()?,
                    });
                }
            }
        }
        Ok(if filters.len() == 1 {
            filters.pop().expect("one filter")
        } else {
            Filter::All(filters)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Holder {
        filter: Filter,
    }

    fn parse(text: &str) -> Filter {
        toml::from_str::<Holder>(text).unwrap().filter
    }

    fn event(ty: &str, source: &str, subject: Option<&str>) -> Event {
        let mut event = Event::new("1", source, ty);
        event.subject = subject.map(str::to_owned);
        event
    }

    #[test]
    fn attribute_matchers_and_combinators() {
        let filter = parse(
            r#"filter = { type = { prefix = "com.github." }, source = { exact = "/hooks/github" } }"#,
        );
        assert!(filter.matches(&event("com.github.push", "/hooks/github", None)));
        assert!(!filter.matches(&event("com.github.push", "/hooks/other", None)));
        assert!(!filter.matches(&event("com.gitlab.push", "/hooks/github", None)));
        let filter = parse(
            r#"filter = { any = [ { subject = { suffix = ".jpg" } }, { subject = { suffix = ".png" } } ] }"#,
        );
        assert!(filter.matches(&event("t", "s", Some("a.png"))));
        assert!(!filter.matches(&event("t", "s", Some("a.gif"))));
        assert!(!filter.matches(&event("t", "s", None)));
        let filter = parse(r#"filter = { not = { type = { exact = "ping" } } }"#);
        assert!(!filter.matches(&event("ping", "s", None)));
        assert!(filter.matches(&event("pong", "s", None)));
        let mut with_extension = event("t", "s", None);
        with_extension
            .extensions
            .insert("region".into(), "eu-west-1".into());
        assert!(parse(r#"filter = { region = { prefix = "eu-" } }"#).matches(&with_extension));
        assert!(Filter::default().matches(&with_extension));
    }

    #[test]
    fn subject_hints_come_from_the_top_level_only() {
        let filter = parse(
            r#"filter = { type = { prefix = "com.github." }, source = { exact = "/hooks/github" } }"#,
        );
        let hints = filter.subject_hints();
        assert_eq!(hints.type_prefix, Some("com.github."));
        assert_eq!(hints.source_exact, Some("/hooks/github"));
        let filter = parse(r#"filter = { any = [ { type = { exact = "a" } } ] }"#);
        assert_eq!(filter.subject_hints(), SubjectHints::default());
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        let error = toml::from_str::<Holder>(r#"filter = { type = { start = "x" } }"#)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("unknown variant `start`"), "{error}");
        let error = toml::from_str::<Holder>(r#"filter = { Type = { exact = "x" } }"#)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("not a cloudevents attribute name"),
            "{error}"
        );
    }
}
