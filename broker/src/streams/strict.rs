//! Strict reading of what clients send the stream API. The JSON types are
//! shared with the SDK (`sockbus_protocol::api`) and read leniently there,
//! so an older SDK still reads answers from a newer broker that added a
//! field. What the broker is *sent* is read through [`from_slice`] and
//! [`from_value`], which refuse a field the type does not know (so a
//! misspelt limit is an error, not ignored) with serde's own words:
//! ``unknown field `x`, expected one of `a`, `b` `` - the text
//! `#[serde(deny_unknown_fields)]` gave before the types were shared.
//!
//! Only the top-level object is checked: the request bodies nest no structs.

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use serde::Deserialize;

/// `serde_json::from_slice`, refusing unknown fields.
pub(crate) fn from_slice<'a, T: Deserialize<'a>>(v: &'a [u8]) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_slice(v);
    let t = T::deserialize(Strict(&mut de))?;
    de.end()?;
    Ok(t)
}

/// `serde_json::from_value`, refusing unknown fields.
pub(crate) fn from_value<T: de::DeserializeOwned>(v: serde_json::Value) -> serde_json::Result<T> {
    T::deserialize(Strict(v))
}

/// A deserializer whose structs refuse keys they do not name.
struct Strict<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_any(v)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, D::Error> {
        self.0
            .deserialize_struct(name, fields, StrictVisitor { v, fields })
    }

    // Only structs are read strictly; a derived struct asks for nothing else.
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

struct StrictVisitor<V> {
    v: V,
    fields: &'static [&'static str],
}

impl<'de, V: Visitor<'de>> Visitor<'de> for StrictVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.v.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.v.visit_map(StrictMap {
            map,
            fields: self.fields,
        })
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.v.visit_seq(seq)
    }
}

struct StrictMap<A> {
    map: A,
    fields: &'static [&'static str],
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for StrictMap<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let Some(key) = self.map.next_key::<String>()? else {
            return Ok(None);
        };
        if !self.fields.contains(&key.as_str()) {
            return Err(de::Error::unknown_field(&key, self.fields));
        }
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.map.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the API types look like: optional fields, a default, an enum.
    mod lenient {
        #[derive(Debug, PartialEq, serde::Deserialize)]
        pub struct Config {
            name: String,
            #[serde(default)]
            limit: Option<u64>,
            #[serde(default)]
            mode: super::Mode,
        }
    }

    /// The same with `deny_unknown_fields`: the errors to match, word for
    /// word (the struct's name is in some of them).
    mod denying {
        #[derive(Debug, PartialEq, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Config {
            name: String,
            #[serde(default)]
            limit: Option<u64>,
            #[serde(default)]
            mode: super::Mode,
        }
    }

    use denying::Config as Denying;
    use lenient::Config as Lenient;

    #[derive(Debug, Default, PartialEq, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        #[default]
        Fast,
        Safe,
    }

    #[test]
    fn strict_reading_refuses_what_deny_unknown_fields_refused_with_the_same_words() {
        for json in [
            r#"{"name":"a","bogus":1}"#,
            r#"{"bogus":1,"name":"a"}"#,
            r#"{"name":"a","limit":1,"mode":"safe","x":null}"#,
            r#"{"name":"a","limit":"ten"}"#,
            r#"{"name":"a","mode":"slow"}"#,
            r#"{"limit":1}"#,
            r#"{"name":"a"} trailing"#,
            r#"[]"#,
            r#""a""#,
            r#"{"name":"a","#,
        ] {
            let want = serde_json::from_str::<Denying>(json)
                .unwrap_err()
                .to_string();
            let got = from_slice::<Lenient>(json.as_bytes())
                .unwrap_err()
                .to_string();
            assert_eq!(got, want, "{json}");
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(json) {
                let want = serde_json::from_value::<Denying>(v.clone())
                    .unwrap_err()
                    .to_string();
                let got = from_value::<Lenient>(v).unwrap_err().to_string();
                assert_eq!(got, want, "{json}");
            }
        }
        // The lenient type itself still reads what it does not know.
        let json = r#"{"name":"a","mode":"safe","bogus":1}"#;
        assert!(serde_json::from_str::<Lenient>(json).is_ok());
    }

    #[test]
    fn strict_reading_reads_everything_the_type_knows() {
        for json in [
            r#"{"name":"a"}"#,
            r#"{"mode":"safe","limit":7,"name":"a"}"#,
            r#"{"name":"a","limit":null}"#,
            r#"["a",7,"safe"]"#,
            r#"["a"]"#,
        ] {
            let want = serde_json::from_str::<Lenient>(json).unwrap();
            assert_eq!(from_slice::<Lenient>(json.as_bytes()).unwrap(), want);
            let v: serde_json::Value = serde_json::from_str(json).unwrap();
            assert_eq!(from_value::<Lenient>(v).unwrap(), want);
        }
    }
}
