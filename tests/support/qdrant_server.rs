//! A Qdrant stand-in for tests and benchmarks: an in-process gRPC server built from
//! qdrant-client's generated server traits, listening on 127.0.0.1 on a free port.
//!
//! It serves what the Qdrant sink calls (health check, collection exists/info/create, payload
//! index creation, get, update-batch with upsert / overwrite-payload / set-payload /
//! update-vectors / delete operations, delete, query) and holds its data in memory. It enforces
//! the Qdrant rules a sink can trip over, with Qdrant's kind of message: a point id is an
//! unsigned integer or a UUID, a vector has the collection's size, the collection must exist,
//! a payload write needs an existing point. It honours `wait`: a write sent without
//! `wait=true` is answered "acknowledged" and applied a little later, as a real server under
//! load would, so a sink that forgets to wait is caught. Tests can make it fail the next N
//! requests with a given code, or answer slowly. Methods the sink never calls answer
//! `UNIMPLEMENTED`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use qdrant_client::qdrant::collections_server::{Collections, CollectionsServer};
use qdrant_client::qdrant::points_server::{Points, PointsServer};
use qdrant_client::qdrant::qdrant_server::{Qdrant, QdrantServer};
use qdrant_client::qdrant::{self as proto, Value};
use serde_json::Value as Json;
use tokio::sync::oneshot;
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

/// Largest request the server decodes: Qdrant's default `max_request_size_mb` (32).
const MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

/// How long a write sent without `wait=true` stays invisible.
const UNWAITED_APPLY_DELAY: Duration = Duration::from_millis(300);

/// A running fake Qdrant; stops when dropped.
pub struct FakeQdrant {
    address: SocketAddr,
    /// Whether the server speaks TLS (`start_tls`).
    tls: bool,
    state: Arc<Mutex<State>>,
    shutdown: Option<oneshot::Sender<()>>,
}

/// A stored point, as a test reads it back.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPoint {
    /// The id as Qdrant prints it: a number or a hyphenated lowercase UUID.
    pub id: String,
    /// The vector (normalised, as Qdrant stores vectors of a cosine collection).
    pub vector: Vec<f32>,
    /// The payload.
    pub payload: Json,
}

/// What a collection looks like from outside.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionSummary {
    /// Vector size.
    pub size: u64,
    /// Distance.
    pub distance: proto::Distance,
    /// Payload fields with an index.
    pub indexed_fields: BTreeSet<String>,
}

impl FakeQdrant {
    /// Starts a server on 127.0.0.1 on a free port, on the current tokio runtime.
    pub async fn start() -> std::io::Result<FakeQdrant> {
        FakeQdrant::start_with(None).await
    }

    /// Like [`start`](Self::start), but the server speaks TLS with this certificate chain and
    /// key (PEM); its [`url`](Self::url) then names `localhost`, for the certificate to match.
    pub async fn start_tls(certificate: &[u8], key: &[u8]) -> std::io::Result<FakeQdrant> {
        FakeQdrant::start_with(Some(tonic::transport::Identity::from_pem(certificate, key))).await
    }

    async fn start_with(
        identity: Option<tonic::transport::Identity>,
    ) -> std::io::Result<FakeQdrant> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let service = Arc::new(Service {
            state: state.clone(),
        });
        let (shutdown, stopped) = oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder();
        let tls = identity.is_some();
        if let Some(identity) = identity {
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(std::io::Error::other)?;
        }
        let server = builder
            .add_service(
                PointsServer::from_arc(service.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(
                CollectionsServer::from_arc(service.clone())
                    .max_decoding_message_size(MAX_REQUEST_BYTES),
            )
            .add_service(QdrantServer::from_arc(service))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            );
        tokio::spawn(async move {
            if let Err(error) = server.await {
                eprintln!("fake Qdrant server stopped: {error}");
            }
        });
        Ok(FakeQdrant {
            address,
            tls,
            state,
            shutdown: Some(shutdown),
        })
    }

    /// The URL to give a client: `http://127.0.0.1:<port>`, or `https://localhost:<port>`.
    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.address.port())
        } else {
            format!("http://{}", self.address)
        }
    }

    /// Creates a cosine collection of `size`-float vectors directly (no request counted).
    pub fn create_collection(&self, name: &str, size: u64) {
        self.lock().collections.insert(
            name.to_owned(),
            Collection::new(size, proto::Distance::Cosine),
        );
    }

    /// The collection's settings, if it exists.
    pub fn collection(&self, name: &str) -> Option<CollectionSummary> {
        self.lock()
            .collections
            .get(name)
            .map(|collection| CollectionSummary {
                size: collection.size,
                distance: collection.distance,
                indexed_fields: collection.indexed_fields.clone(),
            })
    }

    /// The points of a collection, by id (empty if it does not exist).
    pub fn points(&self, collection: &str) -> Vec<StoredPoint> {
        let state = self.lock();
        let Some(collection) = state.collections.get(collection) else {
            return Vec::new();
        };
        collection
            .points
            .iter()
            .map(|(id, point)| StoredPoint {
                id: id.to_string(),
                vector: point.vector.clone(),
                payload: Json::Object(
                    point
                        .payload
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone().into_json()))
                        .collect(),
                ),
            })
            .collect()
    }

    /// Makes the next `count` requests (of any kind) fail with `code`; 0 ends the failures.
    pub fn fail_next(&self, count: u32, code: Code) {
        self.lock().failures = (count > 0).then_some((count, code));
    }

    /// Carries out the next collection creation but answers it DEADLINE_EXCEEDED, as when
    /// the reply was lost on the way: the client's retry then meets "already exists".
    pub fn lose_next_create_answer(&self) {
        self.lock().lose_create_answer = true;
    }

    /// Makes every request wait `delay` before it is handled.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Requests received so far, of every kind (failed ones included).
    pub fn requests(&self) -> u64 {
        self.lock().requests.values().sum()
    }

    /// Requests received so far by method, e.g. `"Points/UpdateBatch"`.
    pub fn requests_by_method(&self) -> BTreeMap<&'static str, u64> {
        self.lock().requests.clone()
    }

    /// Writes received without `wait=true`.
    pub fn unwaited_writes(&self) -> u64 {
        self.lock().unwaited_writes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for FakeQdrant {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A test that panicked while holding the lock leaves valid data behind.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[derive(Default)]
struct State {
    collections: BTreeMap<String, Collection>,
    failures: Option<(u32, Code)>,
    /// The next collection creation is carried out but answered DEADLINE_EXCEEDED.
    lose_create_answer: bool,
    delay: Duration,
    requests: BTreeMap<&'static str, u64>,
    unwaited_writes: u64,
}

struct Collection {
    size: u64,
    distance: proto::Distance,
    indexed_fields: BTreeSet<String>,
    points: BTreeMap<PointId, Stored>,
}

impl Collection {
    fn new(size: u64, distance: proto::Distance) -> Collection {
        Collection {
            size,
            distance,
            indexed_fields: BTreeSet::new(),
            points: BTreeMap::new(),
        }
    }
}

#[derive(Clone)]
struct Stored {
    vector: Vec<f32>,
    payload: HashMap<String, Value>,
}

/// A point id Qdrant accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PointId {
    Number(u64),
    Uuid(Uuid),
}

impl fmt::Display for PointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PointId::Number(number) => write!(f, "{number}"),
            PointId::Uuid(uuid) => write!(f, "{uuid}"),
        }
    }
}

impl PointId {
    fn parse(id: Option<&proto::PointId>) -> Result<PointId, Status> {
        use proto::point_id::PointIdOptions;
        match id.and_then(|id| id.point_id_options.as_ref()) {
            Some(PointIdOptions::Num(number)) => Ok(PointId::Number(*number)),
            Some(PointIdOptions::Uuid(text)) => Uuid::parse_str(text)
                .map(PointId::Uuid)
                .map_err(|_| Status::invalid_argument(format!("Unable to parse UUID: {text}"))),
            None => Err(Status::invalid_argument("No ID options provided")),
        }
    }

    fn to_proto(self) -> proto::PointId {
        match self {
            PointId::Number(number) => number.into(),
            PointId::Uuid(uuid) => uuid.to_string().into(),
        }
    }
}

/// One change to apply to a collection, already validated.
enum Change {
    Upsert(Vec<(PointId, Stored)>),
    Delete(Selection),
    OverwritePayload(Selection, HashMap<String, Value>),
    /// Keys merged into the stored payloads.
    SetPayload(Selection, HashMap<String, Value>),
    UpdateVectors(Vec<(PointId, Vec<f32>)>),
}

enum Selection {
    Ids(Vec<PointId>),
    Filter(proto::Filter),
}

struct Service {
    state: Arc<Mutex<State>>,
}

impl Service {
    /// Counts a request, waits the configured delay, and fails it if told to.
    async fn enter(&self, method: &'static str) -> Result<(), Status> {
        let delay = {
            let mut state = lock(&self.state);
            *state.requests.entry(method).or_default() += 1;
            state.delay
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mut state = lock(&self.state);
        if let Some((count, code)) = state.failures {
            state.failures = (count > 1).then(|| (count - 1, code));
            return Err(Status::new(code, format!("injected failure ({method})")));
        }
        Ok(())
    }

    /// Applies `changes` in order now (`wait=true`) or a little later, answering the status
    /// Qdrant would. Changes are validated before anything is applied or acknowledged.
    fn write(
        &self,
        collection: &str,
        wait: Option<bool>,
        changes: Vec<Change>,
    ) -> Result<i32, Status> {
        if wait == Some(true) {
            let mut state = lock(&self.state);
            let collection = existing_mut(&mut state, collection)?;
            for change in changes {
                apply(collection, change)?;
            }
            Ok(proto::UpdateStatus::Completed as i32)
        } else {
            lock(&self.state).unwaited_writes += 1;
            let state = self.state.clone();
            let collection = collection.to_owned();
            tokio::spawn(async move {
                tokio::time::sleep(UNWAITED_APPLY_DELAY).await;
                let mut state = lock(&state);
                if let Ok(collection) = existing_mut(&mut state, &collection) {
                    for change in changes {
                        if apply(collection, change).is_err() {
                            break;
                        }
                    }
                }
            });
            Ok(proto::UpdateStatus::Acknowledged as i32)
        }
    }

    fn vector_size(&self, collection: &str) -> Result<u64, Status> {
        let mut state = lock(&self.state);
        Ok(existing_mut(&mut state, collection)?.size)
    }
}

fn existing_mut<'a>(state: &'a mut State, name: &str) -> Result<&'a mut Collection, Status> {
    state
        .collections
        .get_mut(name)
        .ok_or_else(|| Status::not_found(format!("Not found: Collection `{name}` doesn't exist!")))
}

fn apply(collection: &mut Collection, change: Change) -> Result<(), Status> {
    match change {
        Change::Upsert(points) => {
            for (id, point) in points {
                collection.points.insert(id, point);
            }
        }
        Change::Delete(selection) => {
            let ids = selected(collection, &selection);
            for id in ids {
                collection.points.remove(&id);
            }
        }
        Change::OverwritePayload(selection, payload) => {
            for id in selected(collection, &selection) {
                match collection.points.get_mut(&id) {
                    Some(point) => point.payload = payload.clone(),
                    None => return Err(no_point(id)),
                }
            }
        }
        Change::SetPayload(selection, payload) => {
            for id in selected(collection, &selection) {
                match collection.points.get_mut(&id) {
                    Some(point) => point
                        .payload
                        .extend(payload.iter().map(|(k, v)| (k.clone(), v.clone()))),
                    None => return Err(no_point(id)),
                }
            }
        }
        Change::UpdateVectors(vectors) => {
            for (id, vector) in vectors {
                match collection.points.get_mut(&id) {
                    Some(point) => point.vector = vector,
                    None => return Err(no_point(id)),
                }
            }
        }
    }
    Ok(())
}

fn no_point(id: PointId) -> Status {
    Status::not_found(format!("Not found: No point with id {id} found"))
}

/// The ids a selection names: listed ids whether they exist or not (a payload write to a
/// missing one fails, a delete ignores it), or the points a filter matches.
fn selected(collection: &Collection, selection: &Selection) -> Vec<PointId> {
    match selection {
        Selection::Ids(ids) => ids.clone(),
        Selection::Filter(filter) => collection
            .points
            .iter()
            .filter(|(_, point)| matches_filter(filter, &point.payload))
            .map(|(id, _)| *id)
            .collect(),
    }
}

/// Checks a point's vector against the collection and normalises it for cosine distance.
fn stored_vector(
    vectors: Option<&proto::Vectors>,
    size: u64,
    distance: proto::Distance,
) -> Result<Vec<f32>, Status> {
    use proto::vectors::VectorsOptions;
    let vector = match vectors.and_then(|vectors| vectors.vectors_options.as_ref()) {
        Some(VectorsOptions::Vector(vector)) => vector,
        Some(VectorsOptions::Vectors(_)) => {
            return Err(Status::invalid_argument(
                "Wrong input: Not existing vector name error: the collection has one unnamed \
                 vector",
            ));
        }
        None => return Err(Status::invalid_argument("Wrong input: point has no vector")),
    };
    let mut values = match &vector.vector {
        Some(proto::vector::Vector::Dense(dense)) => dense.data.clone(),
        Some(_) => {
            return Err(Status::invalid_argument(
                "Wrong input: the collection holds dense vectors",
            ));
        }
        // Clients before 1.16 send the values in the deprecated `data` field.
        #[allow(deprecated)]
        None => vector.data.clone(),
    };
    if values.len() as u64 != size {
        return Err(Status::invalid_argument(format!(
            "Wrong input: Vector dimension error: expected dim: {size}, got {}",
            values.len()
        )));
    }
    if distance == proto::Distance::Cosine {
        let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            values.iter_mut().for_each(|v| *v /= norm);
        }
    }
    Ok(values)
}

fn selection(selector: Option<&proto::PointsSelector>) -> Result<Selection, Status> {
    use proto::points_selector::PointsSelectorOneOf;
    match selector.and_then(|selector| selector.points_selector_one_of.as_ref()) {
        Some(PointsSelectorOneOf::Points(list)) => Ok(Selection::Ids(
            list.ids
                .iter()
                .map(|id| PointId::parse(Some(id)))
                .collect::<Result<_, _>>()?,
        )),
        Some(PointsSelectorOneOf::Filter(filter)) => {
            check_filter(filter)?;
            Ok(Selection::Filter(filter.clone()))
        }
        None => Err(Status::invalid_argument("Wrong input: no points selected")),
    }
}

/// Rejects filters this fake cannot evaluate rather than guessing.
fn check_filter(filter: &proto::Filter) -> Result<(), Status> {
    use proto::condition::ConditionOneOf;
    use proto::r#match::MatchValue;
    if filter.min_should.is_some() {
        return Err(Status::unimplemented("fake Qdrant: min_should"));
    }
    for condition in filter
        .must
        .iter()
        .chain(&filter.should)
        .chain(&filter.must_not)
    {
        match &condition.condition_one_of {
            Some(ConditionOneOf::Field(field)) => {
                match field.r#match.as_ref().and_then(|m| m.match_value.as_ref()) {
                    Some(
                        MatchValue::Keyword(_) | MatchValue::Integer(_) | MatchValue::Boolean(_),
                    ) => {}
                    _ => {
                        return Err(Status::unimplemented(
                            "fake Qdrant: only keyword, integer and boolean matches",
                        ));
                    }
                }
            }
            Some(ConditionOneOf::Filter(inner)) => check_filter(inner)?,
            _ => {
                return Err(Status::unimplemented(
                    "fake Qdrant: only field and nested filter conditions",
                ));
            }
        }
    }
    Ok(())
}

fn matches_filter(filter: &proto::Filter, payload: &HashMap<String, Value>) -> bool {
    filter.must.iter().all(|c| matches_condition(c, payload))
        && (filter.should.is_empty() || filter.should.iter().any(|c| matches_condition(c, payload)))
        && !filter
            .must_not
            .iter()
            .any(|c| matches_condition(c, payload))
}

fn matches_condition(condition: &proto::Condition, payload: &HashMap<String, Value>) -> bool {
    use proto::condition::ConditionOneOf;
    use proto::r#match::MatchValue;
    use proto::value::Kind;
    match &condition.condition_one_of {
        Some(ConditionOneOf::Field(field)) => {
            let wanted = field.r#match.as_ref().and_then(|m| m.match_value.as_ref());
            let equal = |kind: &Option<Kind>| match (wanted, kind) {
                (Some(MatchValue::Keyword(want)), Some(Kind::StringValue(have))) => want == have,
                (Some(MatchValue::Integer(want)), Some(Kind::IntegerValue(have))) => want == have,
                (Some(MatchValue::Boolean(want)), Some(Kind::BoolValue(have))) => want == have,
                _ => false,
            };
            // As in Qdrant, an array value matches when any element does.
            match payload.get(&field.key).map(|value| &value.kind) {
                Some(Some(Kind::ListValue(list))) => list.values.iter().any(|v| equal(&v.kind)),
                Some(kind) => equal(kind),
                None => false,
            }
        }
        Some(ConditionOneOf::Filter(inner)) => matches_filter(inner, payload),
        _ => false,
    }
}

fn operation_response(status: i32) -> proto::PointsOperationResponse {
    proto::PointsOperationResponse {
        result: Some(proto::UpdateResult {
            operation_id: Some(0),
            status,
        }),
        ..Default::default()
    }
}

fn dense_output(vector: &[f32]) -> proto::VectorsOutput {
    proto::VectorsOutput {
        vectors_options: Some(proto::vectors_output::VectorsOptions::Vector(
            proto::VectorOutput {
                vector: Some(proto::vector_output::Vector::Dense(proto::DenseVector {
                    data: vector.to_vec(),
                })),
                ..Default::default()
            },
        )),
    }
}

fn enabled_payload(selector: Option<&proto::WithPayloadSelector>) -> bool {
    use proto::with_payload_selector::SelectorOptions;
    matches!(
        selector.and_then(|s| s.selector_options.as_ref()),
        Some(SelectorOptions::Enable(true))
    )
}

fn enabled_vectors(selector: Option<&proto::WithVectorsSelector>) -> bool {
    use proto::with_vectors_selector::SelectorOptions;
    matches!(
        selector.and_then(|s| s.selector_options.as_ref()),
        Some(SelectorOptions::Enable(true))
    )
}

type Reply<T> = Result<Response<T>, Status>;

fn unimplemented<T>(method: &str) -> Reply<T> {
    Err(Status::unimplemented(format!(
        "fake Qdrant: {method} is not served (the sink does not use it)"
    )))
}

#[tonic::async_trait]
impl Qdrant for Service {
    async fn health_check(
        &self,
        _: Request<proto::HealthCheckRequest>,
    ) -> Reply<proto::HealthCheckReply> {
        self.enter("Qdrant/HealthCheck").await?;
        Ok(Response::new(proto::HealthCheckReply {
            title: "qdrant - fake for pgstream-host tests".into(),
            version: "1.16.0".into(),
            commit: None,
        }))
    }
}

#[tonic::async_trait]
impl Collections for Service {
    async fn get(
        &self,
        request: Request<proto::GetCollectionInfoRequest>,
    ) -> Reply<proto::GetCollectionInfoResponse> {
        self.enter("Collections/Get").await?;
        let name = request.into_inner().collection_name;
        let mut state = lock(&self.state);
        let collection = existing_mut(&mut state, &name)?;
        let params = proto::VectorParams {
            size: collection.size,
            distance: collection.distance as i32,
            ..Default::default()
        };
        Ok(Response::new(proto::GetCollectionInfoResponse {
            result: Some(proto::CollectionInfo {
                status: proto::CollectionStatus::Green as i32,
                segments_count: 1,
                points_count: Some(collection.points.len() as u64),
                config: Some(proto::CollectionConfig {
                    params: Some(proto::CollectionParams {
                        shard_number: 1,
                        vectors_config: Some(proto::VectorsConfig {
                            config: Some(proto::vectors_config::Config::Params(params)),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            time: 0.0,
        }))
    }

    async fn list(
        &self,
        _: Request<proto::ListCollectionsRequest>,
    ) -> Reply<proto::ListCollectionsResponse> {
        unimplemented("Collections/List")
    }

    async fn create(
        &self,
        request: Request<proto::CreateCollection>,
    ) -> Reply<proto::CollectionOperationResponse> {
        self.enter("Collections/Create").await?;
        let request = request.into_inner();
        let params = match request.vectors_config.and_then(|config| config.config) {
            Some(proto::vectors_config::Config::Params(params)) => params,
            _ => return unimplemented("Collections/Create without one unnamed vector"),
        };
        let distance = proto::Distance::try_from(params.distance)
            .ok()
            .filter(|distance| *distance != proto::Distance::UnknownDistance)
            .ok_or_else(|| Status::invalid_argument("Wrong input: unknown distance"))?;
        if params.size == 0 {
            return Err(Status::invalid_argument(
                "Validation error in body: [vectors_config.size: value 0 invalid, must be 1 or larger]",
            ));
        }
        let mut state = lock(&self.state);
        let name = request.collection_name;
        if state.collections.contains_key(&name) {
            return Err(Status::invalid_argument(format!(
                "Wrong input: Collection `{name}` already exists!"
            )));
        }
        state
            .collections
            .insert(name, Collection::new(params.size, distance));
        if std::mem::take(&mut state.lose_create_answer) {
            return Err(Status::deadline_exceeded("injected: the answer was lost"));
        }
        Ok(Response::new(proto::CollectionOperationResponse {
            result: true,
            time: 0.0,
        }))
    }

    async fn update(
        &self,
        _: Request<proto::UpdateCollection>,
    ) -> Reply<proto::CollectionOperationResponse> {
        unimplemented("Collections/Update")
    }

    async fn delete(
        &self,
        _: Request<proto::DeleteCollection>,
    ) -> Reply<proto::CollectionOperationResponse> {
        unimplemented("Collections/Delete")
    }

    async fn update_aliases(
        &self,
        _: Request<proto::ChangeAliases>,
    ) -> Reply<proto::CollectionOperationResponse> {
        unimplemented("Collections/UpdateAliases")
    }

    async fn list_collection_aliases(
        &self,
        _: Request<proto::ListCollectionAliasesRequest>,
    ) -> Reply<proto::ListAliasesResponse> {
        unimplemented("Collections/ListCollectionAliases")
    }

    async fn list_aliases(
        &self,
        _: Request<proto::ListAliasesRequest>,
    ) -> Reply<proto::ListAliasesResponse> {
        unimplemented("Collections/ListAliases")
    }

    async fn collection_cluster_info(
        &self,
        _: Request<proto::CollectionClusterInfoRequest>,
    ) -> Reply<proto::CollectionClusterInfoResponse> {
        unimplemented("Collections/CollectionClusterInfo")
    }

    async fn collection_exists(
        &self,
        request: Request<proto::CollectionExistsRequest>,
    ) -> Reply<proto::CollectionExistsResponse> {
        self.enter("Collections/CollectionExists").await?;
        let exists = lock(&self.state)
            .collections
            .contains_key(&request.into_inner().collection_name);
        Ok(Response::new(proto::CollectionExistsResponse {
            result: Some(proto::CollectionExists { exists }),
            time: 0.0,
        }))
    }

    async fn update_collection_cluster_setup(
        &self,
        _: Request<proto::UpdateCollectionClusterSetupRequest>,
    ) -> Reply<proto::UpdateCollectionClusterSetupResponse> {
        unimplemented("Collections/UpdateCollectionClusterSetup")
    }

    async fn create_shard_key(
        &self,
        _: Request<proto::CreateShardKeyRequest>,
    ) -> Reply<proto::CreateShardKeyResponse> {
        unimplemented("Collections/CreateShardKey")
    }

    async fn delete_shard_key(
        &self,
        _: Request<proto::DeleteShardKeyRequest>,
    ) -> Reply<proto::DeleteShardKeyResponse> {
        unimplemented("Collections/DeleteShardKey")
    }

    async fn list_shard_keys(
        &self,
        _: Request<proto::ListShardKeysRequest>,
    ) -> Reply<proto::ListShardKeysResponse> {
        unimplemented("Collections/ListShardKeys")
    }
}

#[tonic::async_trait]
impl Points for Service {
    async fn upsert(
        &self,
        _: Request<proto::UpsertPoints>,
    ) -> Reply<proto::PointsOperationResponse> {
        unimplemented("Points/Upsert")
    }

    async fn delete(
        &self,
        request: Request<proto::DeletePoints>,
    ) -> Reply<proto::PointsOperationResponse> {
        self.enter("Points/Delete").await?;
        let request = request.into_inner();
        self.vector_size(&request.collection_name)?;
        let change = Change::Delete(selection(request.points.as_ref())?);
        let status = self.write(&request.collection_name, request.wait, vec![change])?;
        Ok(Response::new(operation_response(status)))
    }

    async fn get(&self, request: Request<proto::GetPoints>) -> Reply<proto::GetResponse> {
        self.enter("Points/Get").await?;
        let request = request.into_inner();
        let ids = request
            .ids
            .iter()
            .map(|id| PointId::parse(Some(id)))
            .collect::<Result<Vec<_>, _>>()?;
        let with_payload = enabled_payload(request.with_payload.as_ref());
        let with_vectors = enabled_vectors(request.with_vectors.as_ref());
        let mut state = lock(&self.state);
        let collection = existing_mut(&mut state, &request.collection_name)?;
        // Like Qdrant, missing ids are left out of the answer rather than failing it.
        let result = ids
            .into_iter()
            .filter_map(|id| {
                collection
                    .points
                    .get(&id)
                    .map(|point| proto::RetrievedPoint {
                        id: Some(id.to_proto()),
                        payload: if with_payload {
                            point.payload.clone()
                        } else {
                            HashMap::new()
                        },
                        vectors: with_vectors.then(|| dense_output(&point.vector)),
                        ..Default::default()
                    })
            })
            .collect();
        Ok(Response::new(proto::GetResponse {
            result,
            ..Default::default()
        }))
    }

    async fn update_vectors(
        &self,
        _: Request<proto::UpdatePointVectors>,
    ) -> Reply<proto::PointsOperationResponse> {
        unimplemented("Points/UpdateVectors")
    }

    async fn delete_vectors(
        &self,
        _: Request<proto::DeletePointVectors>,
    ) -> Reply<proto::PointsOperationResponse> {
        unimplemented("Points/DeleteVectors")
    }

    async fn set_payload(
        &self,
        _: Request<proto::SetPayloadPoints>,
    ) -> Reply<proto::PointsOperationResponse> {
        unimplemented("Points/SetPayload")
    }

    async fn overwrite_payload(
        &self,
        _: Request<proto::SetPayloadPoints>,
    ) -> Reply<proto::PointsOperationResponse> {
        unimplemented("Points/OverwritePayload")
    }

    async fn delete_payload(
        &self,
        _: Request<proto::DeletePayloadPoints>,
    ) -> Reply<proto::PointsOperationResponse> {
        unimplemented("Points/DeletePayload")
    }

    async fn clear_payload(
        &self,
        _: Request<proto::ClearPayloadPoints>,
    ) -> Reply<proto::PointsOperationResponse> {
        unimplemented("Points/ClearPayload")
    }

    async fn create_field_index(
        &self,
        request: Request<proto::CreateFieldIndexCollection>,
    ) -> Reply<proto::PointsOperationResponse> {
        self.enter("Points/CreateFieldIndex").await?;
        let request = request.into_inner();
        let mut state = lock(&self.state);
        existing_mut(&mut state, &request.collection_name)?
            .indexed_fields
            .insert(request.field_name);
        Ok(Response::new(operation_response(
            proto::UpdateStatus::Completed as i32,
        )))
    }

    async fn delete_field_index(
        &self,
        _: Request<proto::DeleteFieldIndexCollection>,
    ) -> Reply<proto::PointsOperationResponse> {
        unimplemented("Points/DeleteFieldIndex")
    }

    async fn create_vector_name(
        &self,
        _: Request<proto::CreateVectorNameRequest>,
    ) -> Reply<proto::PointsOperationResponse> {
        unimplemented("Points/CreateVectorName")
    }

    async fn delete_vector_name(
        &self,
        _: Request<proto::DeleteVectorNameRequest>,
    ) -> Reply<proto::PointsOperationResponse> {
        unimplemented("Points/DeleteVectorName")
    }

    async fn search(&self, _: Request<proto::SearchPoints>) -> Reply<proto::SearchResponse> {
        unimplemented("Points/Search")
    }

    async fn search_batch(
        &self,
        _: Request<proto::SearchBatchPoints>,
    ) -> Reply<proto::SearchBatchResponse> {
        unimplemented("Points/SearchBatch")
    }

    async fn search_groups(
        &self,
        _: Request<proto::SearchPointGroups>,
    ) -> Reply<proto::SearchGroupsResponse> {
        unimplemented("Points/SearchGroups")
    }

    async fn scroll(&self, _: Request<proto::ScrollPoints>) -> Reply<proto::ScrollResponse> {
        unimplemented("Points/Scroll")
    }

    async fn recommend(
        &self,
        _: Request<proto::RecommendPoints>,
    ) -> Reply<proto::RecommendResponse> {
        unimplemented("Points/Recommend")
    }

    async fn recommend_batch(
        &self,
        _: Request<proto::RecommendBatchPoints>,
    ) -> Reply<proto::RecommendBatchResponse> {
        unimplemented("Points/RecommendBatch")
    }

    async fn recommend_groups(
        &self,
        _: Request<proto::RecommendPointGroups>,
    ) -> Reply<proto::RecommendGroupsResponse> {
        unimplemented("Points/RecommendGroups")
    }

    async fn discover(&self, _: Request<proto::DiscoverPoints>) -> Reply<proto::DiscoverResponse> {
        unimplemented("Points/Discover")
    }

    async fn discover_batch(
        &self,
        _: Request<proto::DiscoverBatchPoints>,
    ) -> Reply<proto::DiscoverBatchResponse> {
        unimplemented("Points/DiscoverBatch")
    }

    async fn count(&self, _: Request<proto::CountPoints>) -> Reply<proto::CountResponse> {
        unimplemented("Points/Count")
    }

    async fn update_batch(
        &self,
        request: Request<proto::UpdateBatchPoints>,
    ) -> Reply<proto::UpdateBatchResponse> {
        use proto::points_update_operation::Operation;
        self.enter("Points/UpdateBatch").await?;
        let request = request.into_inner();
        let mut state = lock(&self.state);
        let collection = existing_mut(&mut state, &request.collection_name)?;
        let (size, distance) = (collection.size, collection.distance);
        drop(state);
        let mut changes = Vec::with_capacity(request.operations.len());
        for operation in &request.operations {
            changes.push(match &operation.operation {
                Some(Operation::Upsert(list)) => Change::Upsert(
                    list.points
                        .iter()
                        .map(|point| {
                            Ok((
                                PointId::parse(point.id.as_ref())?,
                                Stored {
                                    vector: stored_vector(point.vectors.as_ref(), size, distance)?,
                                    payload: point.payload.clone(),
                                },
                            ))
                        })
                        .collect::<Result<_, Status>>()?,
                ),
                Some(Operation::OverwritePayload(overwrite)) => Change::OverwritePayload(
                    selection(overwrite.points_selector.as_ref())?,
                    overwrite.payload.clone(),
                ),
                Some(Operation::SetPayload(set)) => Change::SetPayload(
                    selection(set.points_selector.as_ref())?,
                    set.payload.clone(),
                ),
                Some(Operation::UpdateVectors(update)) => Change::UpdateVectors(
                    update
                        .points
                        .iter()
                        .map(|point| {
                            Ok((
                                PointId::parse(point.id.as_ref())?,
                                stored_vector(point.vectors.as_ref(), size, distance)?,
                            ))
                        })
                        .collect::<Result<_, Status>>()?,
                ),
                Some(Operation::DeletePoints(delete)) => {
                    Change::Delete(selection(delete.points.as_ref())?)
                }
                _ => return unimplemented("Points/UpdateBatch with this operation"),
            });
        }
        let operations = changes.len();
        let status = self.write(&request.collection_name, request.wait, changes)?;
        Ok(Response::new(proto::UpdateBatchResponse {
            result: vec![
                proto::UpdateResult {
                    operation_id: Some(0),
                    status
                };
                operations
            ],
            ..Default::default()
        }))
    }

    async fn query(&self, request: Request<proto::QueryPoints>) -> Reply<proto::QueryResponse> {
        use proto::query::Variant;
        use proto::vector_input::Variant as Input;
        self.enter("Points/Query").await?;
        let request = request.into_inner();
        let query = match request.query.and_then(|query| query.variant) {
            Some(Variant::Nearest(proto::VectorInput {
                variant: Some(Input::Dense(dense)),
            })) => dense.data,
            _ => return unimplemented("Points/Query other than nearest to a dense vector"),
        };
        if request
            .filter
            .as_ref()
            .is_some_and(|filter| check_filter(filter).is_err())
        {
            return unimplemented("Points/Query with this filter");
        }
        let with_payload = enabled_payload(request.with_payload.as_ref());
        let with_vectors = enabled_vectors(request.with_vectors.as_ref());
        let mut state = lock(&self.state);
        let collection = existing_mut(&mut state, &request.collection_name)?;
        if query.len() as u64 != collection.size {
            return Err(Status::invalid_argument(format!(
                "Wrong input: Vector dimension error: expected dim: {}, got {}",
                collection.size,
                query.len()
            )));
        }
        let norm = query
            .iter()
            .map(|v| v * v)
            .sum::<f32>()
            .sqrt()
            .max(f32::MIN_POSITIVE);
        let mut scored: Vec<(f32, PointId, &Stored)> = collection
            .points
            .iter()
            .filter(|(_, point)| {
                request
                    .filter
                    .as_ref()
                    .is_none_or(|f| matches_filter(f, &point.payload))
            })
            .map(|(id, point)| {
                let dot: f32 = query.iter().zip(&point.vector).map(|(a, b)| a * b).sum();
                (dot / norm, *id, point)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let limit = request.limit.unwrap_or(10) as usize;
        let result = scored
            .into_iter()
            .take(limit)
            .map(|(score, id, point)| proto::ScoredPoint {
                id: Some(id.to_proto()),
                payload: if with_payload {
                    point.payload.clone()
                } else {
                    HashMap::new()
                },
                score,
                vectors: with_vectors.then(|| dense_output(&point.vector)),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(proto::QueryResponse {
            result,
            ..Default::default()
        }))
    }

    async fn query_batch(
        &self,
        _: Request<proto::QueryBatchPoints>,
    ) -> Reply<proto::QueryBatchResponse> {
        unimplemented("Points/QueryBatch")
    }

    async fn query_groups(
        &self,
        _: Request<proto::QueryPointGroups>,
    ) -> Reply<proto::QueryGroupsResponse> {
        unimplemented("Points/QueryGroups")
    }

    async fn facet(&self, _: Request<proto::FacetCounts>) -> Reply<proto::FacetResponse> {
        unimplemented("Points/Facet")
    }

    async fn search_matrix_pairs(
        &self,
        _: Request<proto::SearchMatrixPoints>,
    ) -> Reply<proto::SearchMatrixPairsResponse> {
        unimplemented("Points/SearchMatrixPairs")
    }

    async fn search_matrix_offsets(
        &self,
        _: Request<proto::SearchMatrixPoints>,
    ) -> Reply<proto::SearchMatrixOffsetsResponse> {
        unimplemented("Points/SearchMatrixOffsets")
    }
}
