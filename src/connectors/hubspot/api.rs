//! The parts of HubSpot's API outside batch writes: the properties API (an object's schema),
//! `batch/read` (record ids by a unique property) and the lists API. Every call goes through
//! the connection's rate limiter and is retried when HubSpot says to.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use http::{HeaderMap, Method};
use serde::Deserialize;
use serde_json::{Value, json};

use super::config::{HubspotConfig, normalize};
use super::retry::{self, HubspotRetryLogic};
use crate::connectors::field_meta;
use crate::delivery::control::{self, Call, ControlPlane, expect_success};
use crate::delivery::{
    AdaptiveLimiter, DeliveryMetrics, HttpResponse, ResponseClass, RetryPolicy, Ticket,
};
use crate::error::{Error, Result};

/// The standard CRM objects (`objectType` in paths) and their object type ids.
pub const STANDARD_OBJECTS: &[(&str, &str)] = &[
    ("contacts", "0-1"),
    ("companies", "0-2"),
    ("deals", "0-3"),
    ("tickets", "0-5"),
];

/// One HubSpot object as its properties describe it.
#[derive(Debug)]
pub struct ObjectSchema {
    /// The object type as paths spell it (`contacts`, `2-123456`).
    pub name: String,
    pub fields: SchemaRef,
    /// The default match key (`email` for contacts, else a unique property, else `hs_object_id`).
    pub key: String,
    /// Enumeration properties and their option values.
    pub options: HashMap<String, Arc<HashSet<String>>>,
}

impl ObjectSchema {
    /// Whether `field` can identify records in batch upsert / update / read / archive.
    pub fn is_id_property(&self, field: &str) -> bool {
        field == "hs_object_id"
            || (self.name == "contacts" && field == "email")
            || self
                .fields
                .field_with_name(field)
                .is_ok_and(|f| f.metadata().get(field_meta::UNIQUE).is_some())
    }

    /// The properties that can identify records, for messages.
    pub fn id_properties(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .fields
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .filter(|n| self.is_id_property(n))
            .collect();
        ids.sort();
        ids
    }
}

#[derive(Debug, Deserialize)]
struct PropertiesBody {
    #[serde(default)]
    results: Vec<Property>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Property {
    name: String,
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    has_unique_value: bool,
    #[serde(default)]
    calculated: bool,
    #[serde(default)]
    modification_metadata: Option<ModificationMetadata>,
    #[serde(default)]
    options: Vec<PropertyOption>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ModificationMetadata {
    #[serde(default)]
    read_only_value: bool,
}

#[derive(Debug, Deserialize)]
struct PropertyOption {
    value: String,
}

/// What every statement on one HubSpot connection shares: options, HTTP client, rate limiter
/// and the object schemas read so far.
#[derive(Debug)]
pub struct HubspotConnection {
    pub name: String,
    pub config: Arc<HubspotConfig>,
    pub client: reqwest::Client,
    pub limiter: Arc<AdaptiveLimiter>,
    schemas: Mutex<HashMap<String, Arc<ObjectSchema>>>,
    lists: Mutex<HashMap<String, String>>,
}

impl HubspotConnection {
    pub fn new(name: &str, config: HubspotConfig, client: reqwest::Client) -> Self {
        Self {
            name: name.to_string(),
            limiter: Arc::new(AdaptiveLimiter::new(config.http.rate_limit).for_connection(name)),
            config: Arc::new(config),
            client,
            schemas: Mutex::default(),
            lists: Mutex::default(),
        }
    }

    /// An object's schema as already read, without a call.
    pub fn cached(&self, object: &str) -> Option<Arc<ObjectSchema>> {
        self.schemas
            .lock()
            .expect("schemas lock")
            .get(&object.to_lowercase())
            .cloned()
    }

    /// Custom objects read so far.
    pub fn cached_names(&self) -> Vec<String> {
        self.schemas
            .lock()
            .expect("schemas lock")
            .keys()
            .cloned()
            .collect()
    }

    /// An object's schema from `GET /crm/v3/properties/{object}` (once per connection), or
    /// `None` when HubSpot has no such object.
    pub async fn object_schema(&self, object: &str) -> Result<Option<Arc<ObjectSchema>>> {
        let object = object.to_lowercase();
        if let Some(schema) = self.cached(&object) {
            return Ok(Some(schema));
        }
        if !valid_object_type(&object) {
            return Ok(None);
        }
        let response = self
            .call(
                Method::GET,
                &format!("/crm/v3/properties/{object}"),
                None,
                None,
            )
            .await?;
        if matches!(response.status.as_u16(), 400 | 404) {
            return Ok(None);
        }
        let body: PropertiesBody = serde_json::from_slice(&response.body).map_err(|e| {
            self.error(format!(
                "the properties of '{object}' came back in a shape sluice does not know ({e})"
            ))
        })?;
        let schema = Arc::new(object_schema(&object, body.results));
        self.schemas
            .lock()
            .expect("schemas lock")
            .insert(object, Arc::clone(&schema));
        Ok(Some(schema))
    }

    /// Record ids of the records whose `id_property` has one of `values` (`batch/read`, 100 per
    /// call). Values HubSpot has no record for are left out.
    pub async fn read_ids(
        &self,
        object: &str,
        id_property: &str,
        values: &[String],
        metrics: Option<&DeliveryMetrics>,
    ) -> Result<HashMap<String, String>> {
        let mut found = HashMap::new();
        for chunk in values.chunks(super::config::MAX_BATCH_SIZE) {
            let inputs: Vec<Value> = chunk.iter().map(|v| json!({ "id": v })).collect();
            let body = json!({
                "idProperty": id_property,
                "properties": [id_property],
                "inputs": inputs,
            });
            let response = self
                .call(
                    Method::POST,
                    &format!("/crm/v3/objects/{object}/batch/read"),
                    Some(body),
                    metrics,
                )
                .await?;
            expect_success(
                self,
                &response,
                &format!("reading record ids of {object} by '{id_property}'"),
            )?;
            for (id, value) in retry::result_ids(&response.body, id_property) {
                if let Some(value) = value {
                    found.insert(normalize(id_property, &value), id);
                }
            }
        }
        Ok(found)
    }

    /// The id of the static list named (or numbered) `list` of `object`; a MANUAL list is
    /// created when none has that name.
    pub async fn list_id(
        &self,
        object: &str,
        list: &str,
        metrics: Option<&DeliveryMetrics>,
    ) -> Result<String> {
        if let Some(id) = self.lists.lock().expect("lists lock").get(list) {
            return Ok(id.clone());
        }
        let type_id = STANDARD_OBJECTS
            .iter()
            .find(|(name, _)| *name == object)
            .map(|(_, id)| *id)
            .unwrap_or(object);
        let id = if list.chars().all(|c| c.is_ascii_digit()) {
            list.to_string()
        } else {
            let path = format!(
                "/crm/v3/lists/object-type-id/{type_id}/name/{}",
                url_escape(list)
            );
            let found = self.call(Method::GET, &path, None, metrics).await?;
            if found.status.as_u16() != 404 {
                expect_success(self, &found, &format!("looking up the list '{list}'"))?;
            }
            if found.status.is_success() {
                list_id_of(&found.body)
            } else {
                let body =
                    json!({"name": list, "objectTypeId": type_id, "processingType": "MANUAL"});
                let created = self
                    .call(Method::POST, "/crm/v3/lists", Some(body), metrics)
                    .await?;
                expect_success(
                    self,
                    &created,
                    &format!("creating the static list '{list}'"),
                )?;
                list_id_of(&created.body)
            }
            .ok_or_else(|| {
                self.error(format!(
                    "HubSpot's answer about the list '{list}' has no listId"
                ))
            })?
        };
        self.lists
            .lock()
            .expect("lists lock")
            .insert(list.to_string(), id.clone());
        Ok(id)
    }

    /// One control-plane call (see [`control::call`]).
    /// `metrics`: the write's session metrics, when the call is part of a write.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        metrics: Option<&DeliveryMetrics>,
    ) -> Result<HttpResponse> {
        let mut call = Call::new(method, path);
        if let Some(body) = &body {
            call = call.json(body);
        }
        control::call(self, call, metrics).await
    }

    pub fn error(&self, message: String) -> Error {
        Error::Write {
            message: format!("hubspot {}: {message}", self.name),
        }
    }
}

#[async_trait]
impl ControlPlane for HubspotConnection {
    type Auth = ();

    fn service(&self) -> &str {
        "HubSpot"
    }

    fn policy(&self) -> RetryPolicy {
        self.config.http.retry
    }

    fn limiter(&self) -> &AdaptiveLimiter {
        &self.limiter
    }

    async fn request(&self, call: &Call<'_>) -> Result<(reqwest::RequestBuilder, ())> {
        let request = self
            .client
            .request(call.method.clone(), self.config.endpoint(call.path))
            .bearer_auth(self.config.token.expose());
        Ok((request, ()))
    }

    fn observe(&self, ticket: Ticket, headers: &HeaderMap) {
        if let Some(w) = retry::rate_window(headers) {
            self.limiter.observe_window(ticket, w);
        }
    }

    fn classify(&self, response: &HttpResponse) -> Option<ResponseClass> {
        HubspotRetryLogic::classify_status(response)
    }

    fn error(&self, message: String) -> Error {
        HubspotConnection::error(self, message)
    }

    fn summary(&self, response: &HttpResponse) -> String {
        retry::summary(response)
    }

    fn code(&self, response: &HttpResponse) -> Option<String> {
        retry::error_code(response)
    }
}

fn list_id_of(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let list = v.get("list").unwrap_or(&v);
    match list.get("listId")? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A list name as one path segment.
fn url_escape(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

/// `contacts`, `companies`, `deals`, `tickets`, custom object type ids (`2-123456`) and fully
/// qualified names (`p_portal_name`).
pub fn valid_object_type(object: &str) -> bool {
    STANDARD_OBJECTS.iter().any(|(name, _)| *name == object)
        || object.starts_with("p_")
            && object[2..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        || object.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.chars().all(|c| c.is_ascii_digit())
                && b.chars().all(|c| c.is_ascii_digit())
        })
}

/// Arrow fields from HubSpot properties: string → Utf8, number → Float64, date → Date32,
/// datetime → Timestamp(ms, UTC), bool → Boolean, enumeration → Utf8 with its options; the
/// HubSpot type, read-only, unique and options travel as field metadata.
fn object_schema(object: &str, properties: Vec<Property>) -> ObjectSchema {
    let mut fields = Vec::with_capacity(properties.len());
    let mut options = HashMap::new();
    let mut unique = vec![];
    for p in properties {
        let data_type = match p.kind.as_str() {
            "number" => DataType::Float64,
            "date" => DataType::Date32,
            "datetime" => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            "bool" => DataType::Boolean,
            _ => DataType::Utf8,
        };
        let mut meta = HashMap::from([(field_meta::TYPE.to_string(), p.kind.clone())]);
        let read_only = p.calculated
            || p.modification_metadata
                .as_ref()
                .is_some_and(|m| m.read_only_value);
        // hs_object_id is HubSpot's own id: read-only as a value, but a valid match key.
        if read_only && p.name != "hs_object_id" {
            meta.insert(field_meta::READ_ONLY.into(), "true".into());
        }
        if p.has_unique_value {
            meta.insert(field_meta::UNIQUE.into(), "true".into());
            unique.push(p.name.clone());
        }
        if p.kind == "enumeration" && !p.options.is_empty() {
            let values: Vec<String> = p.options.into_iter().map(|o| o.value).collect();
            meta.insert(
                field_meta::OPTIONS.into(),
                serde_json::to_string(&values).unwrap_or_default(),
            );
            options.insert(p.name.clone(), Arc::new(values.into_iter().collect()));
        }
        fields.push(Field::new(&p.name, data_type, true).with_metadata(meta));
    }
    let has = |name: &str| fields.iter().any(|f| f.name() == name);
    let key = if object == "contacts" && has("email") {
        "email".to_string()
    } else {
        unique
            .into_iter()
            .find(|n| n != "hs_object_id")
            .unwrap_or_else(|| "hs_object_id".into())
    };
    ObjectSchema {
        name: object.to_string(),
        fields: Arc::new(Schema::new(fields)),
        key,
        options,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_become_typed_fields() {
        let body = r#"{"results":[
            {"name":"email","type":"string","hasUniqueValue":false},
            {"name":"amount","type":"number"},
            {"name":"closedate","type":"date"},
            {"name":"lastseen","type":"datetime"},
            {"name":"vip","type":"bool"},
            {"name":"tier","type":"enumeration","options":[{"label":"Gold","value":"gold"}]},
            {"name":"createdate","type":"datetime","modificationMetadata":{"readOnlyValue":true}},
            {"name":"hs_object_id","type":"number","modificationMetadata":{"readOnlyValue":true}},
            {"name":"external_id","type":"string","hasUniqueValue":true}]}"#;
        let body: PropertiesBody = serde_json::from_str(body).unwrap();
        let contacts = object_schema("contacts", body.results);
        assert_eq!(contacts.key, "email");
        let f = &contacts.fields;
        assert_eq!(
            f.field_with_name("amount").unwrap().data_type(),
            &DataType::Float64
        );
        assert_eq!(
            f.field_with_name("closedate").unwrap().data_type(),
            &DataType::Date32
        );
        assert!(
            f.field_with_name("createdate")
                .unwrap()
                .metadata()
                .contains_key(field_meta::READ_ONLY)
        );
        assert!(
            !f.field_with_name("hs_object_id")
                .unwrap()
                .metadata()
                .contains_key(field_meta::READ_ONLY)
        );
        assert!(contacts.options["tier"].contains("gold"));
        assert!(contacts.is_id_property("external_id") && contacts.is_id_property("email"));
        assert!(!contacts.is_id_property("tier"));
    }

    #[test]
    fn object_types() {
        assert!(valid_object_type("contacts"));
        assert!(valid_object_type("2-123456"));
        assert!(valid_object_type("p_123_cars"));
        assert!(!valid_object_type("list_members"));
        assert!(!valid_object_type("../x"));
    }
}
