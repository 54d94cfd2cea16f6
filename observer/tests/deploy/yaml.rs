//! YAML documents as `serde_json::Value`s, so that the checks can use JSON pointers.
use serde_json::{Map, Number, Value};
use yaml_rust2::{Yaml, YamlLoader};

/// Every document of `text` (a `kubectl kustomize` output, a rule file, ...); empty documents
/// are left out.
pub fn parse_all(text: &str) -> Result<Vec<Value>, String> {
    let docs = YamlLoader::load_from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    docs.iter().filter(|d| !matches!(d, Yaml::Null)).map(to_json).collect()
}

/// The one document of `text`.
pub fn parse_one(text: &str) -> Result<Value, String> {
    let mut docs = parse_all(text)?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        n => Err(format!("expected one YAML document, found {n}")),
    }
}

fn to_json(y: &Yaml) -> Result<Value, String> {
    Ok(match y {
        Yaml::Real(s) => {
            let f: f64 = s.parse().map_err(|_| format!("bad number {s}"))?;
            Number::from_f64(f).map_or(Value::String(s.clone()), Value::Number)
        }
        Yaml::Integer(i) => Value::Number((*i).into()),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(to_json).collect::<Result<_, _>>()?),
        Yaml::Hash(h) => {
            let mut map = Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) | Yaml::Real(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}")),
                };
                map.insert(key, to_json(v)?);
            }
            Value::Object(map)
        }
        Yaml::Null => Value::Null,
        Yaml::Alias(_) | Yaml::BadValue => return Err("YAML aliases are not supported here".to_string()),
    })
}
