//! The SQL side of replication, over a regular connection: checking that the source can be
//! replicated at all (`preflight`), creating the publication and slot idempotently (`setup`),
//! removing them (`teardown`), and reading a slot's confirmed position and its hold on WAL.
//!
//! Slot and publication names are checked before any SQL runs, and `setup` undoes what it
//! created when a later step fails, so a refused setup leaves the database as it found it.

use std::fmt;
use std::str::FromStr;

use tokio_postgres::Client;

use super::error::{ReplicationError, ServerError};
use super::stream::quote_identifier;
use crate::lsn::Lsn;

/// A schema-qualified table name, as Postgres stores it (case preserved, no quotes).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    /// The schema, `public` when the text named none.
    pub schema: String,
    /// The table.
    pub name: String,
}

impl TableName {
    /// `"schema"."name"`, always quoted: safe to splice into SQL.
    pub fn quoted(&self) -> String {
        format!(
            "{}.{}",
            quote_identifier(&self.schema),
            quote_identifier(&self.name)
        )
    }
}

/// The text is not `table`, `schema.table` or a quoted form of those.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid table name {text:?}: {reason}")]
pub struct ParseTableNameError {
    text: String,
    reason: &'static str,
}

impl FromStr for TableName {
    type Err = ParseTableNameError;

    /// Parses like Postgres: unquoted identifiers fold to lower case, `"quoted"` ones keep case,
    /// dots and spaces (`""` is a literal quote); a name without schema is in `public`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = |reason| ParseTableNameError {
            text: text.to_owned(),
            reason,
        };
        let mut parts = Vec::with_capacity(2);
        let mut chars = text.trim().chars().peekable();
        loop {
            let mut part = String::new();
            if chars.next_if_eq(&'"').is_some() {
                loop {
                    match chars.next() {
                        Some('"') if chars.next_if_eq(&'"').is_some() => part.push('"'),
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err(error("unterminated quoted identifier")),
                    }
                }
            } else {
                while let Some(c) = chars.next_if(|c| *c != '.') {
                    if c == '"' || c.is_whitespace() {
                        return Err(error("unquoted names cannot contain quotes or spaces"));
                    }
                    part.extend(c.to_lowercase());
                }
            }
            if part.is_empty() {
                return Err(error("empty name"));
            }
            parts.push(part);
            match chars.next() {
                None => break,
                Some('.') => {}
                Some(_) => return Err(error("expected '.' or the end after a quoted name")),
            }
        }
        let mut parts = parts.into_iter();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), None, None) => Ok(TableName {
                schema: "public".into(),
                name,
            }),
            (Some(schema), Some(name), None) => Ok(TableName { schema, name }),
            _ => Err(error("expected at most schema.table")),
        }
    }
}

/// Read from its text form (`schema.table`, `table`, quoted parts), as in a config file.
impl<'de> serde::Deserialize<'de> for TableName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<TableName, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for TableName {
    /// `schema.table`, quoting only the parts that would not survive unquoted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let part = |text: &str| {
            let plain = text
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && text
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
            if plain {
                text.to_owned()
            } else {
                quote_identifier(text)
            }
        };
        write!(f, "{}.{}", part(&self.schema), part(&self.name))
    }
}

/// The longest name Postgres keeps (`NAMEDATALEN - 1` bytes); it cuts longer identifiers short.
const MAX_NAME_BYTES: usize = 63;

/// A replication slot or publication name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} name {name:?}: {rule}{suggestion}")]
pub struct InvalidNameError {
    kind: &'static str,
    name: String,
    rule: &'static str,
    /// ` (try "...")`, or empty.
    suggestion: String,
}

/// Checks a replication slot name against Postgres's rule: 1 to 63 bytes of lower-case ASCII
/// letters, digits and underscores.
pub fn validate_slot_name(name: &str) -> Result<(), InvalidNameError> {
    let valid = |name: &str| {
        !name.is_empty()
            && name.len() <= MAX_NAME_BYTES
            && name
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_')
    };
    if valid(name) {
        return Ok(());
    }
    let suggested: String = name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    Err(InvalidNameError {
        kind: "replication slot",
        name: name.to_owned(),
        rule: "slot names are 1 to 63 lower-case letters (a-z), digits and underscores",
        suggestion: if valid(&suggested) {
            format!(" (try {suggested:?})")
        } else {
            String::new()
        },
    })
}

/// Checks a publication name: 1 to 63 bytes without control characters. Postgres accepts any
/// identifier (pgstream always quotes it), but would cut a longer one short, after which the
/// name given no longer finds it.
pub fn validate_publication_name(name: &str) -> Result<(), InvalidNameError> {
    if !name.is_empty() && name.len() <= MAX_NAME_BYTES && !name.contains(char::is_control) {
        return Ok(());
    }
    Err(InvalidNameError {
        kind: "publication",
        name: name.to_owned(),
        rule: "publication names are 1 to 63 bytes without control characters",
        suggestion: String::new(),
    })
}

/// What [`setup`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupReport {
    /// The slot did not exist and was created now.
    pub slot_created: bool,
    /// The publication did not exist and was created now.
    pub publication_created: bool,
    /// Tables that already had rows just before the slot was created: those rows predate the
    /// slot and will not be streamed. Empty unless `slot_created`.
    pub tables_with_rows: Vec<TableName>,
}

/// Makes sure `publication` covers `tables` and a pgoutput logical slot `slot` exists.
/// Idempotent: an existing publication is reused (missing tables are added to it), an existing
/// pgoutput slot is reused. The publication is created first so the slot's snapshot point comes
/// after it.
///
/// All or nothing: the names are checked (see [`validate_slot_name`] and
/// [`validate_publication_name`]) and an existing slot's plugin is looked at before anything is
/// created, and if creating the slot fails, the publication change made for it is undone.
/// (A slot cannot be created in a transaction that wrote anything, so one transaction cannot
/// hold both.)
pub async fn setup(
    client: &Client,
    slot: &str,
    publication: &str,
    tables: &[TableName],
) -> Result<SetupReport, ReplicationError> {
    validate_slot_name(slot)?;
    validate_publication_name(publication)?;
    let existing = client
        .query_opt(
            "SELECT plugin FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    if let Some(row) = &existing {
        let plugin: Option<String> = row.get(0);
        if plugin.as_deref() != Some("pgoutput") {
            return Err(ReplicationError::SlotPluginMismatch {
                slot: slot.to_owned(),
                plugin: plugin.unwrap_or_else(|| "(physical slot)".into()),
            });
        }
    }
    let slot_needed = existing.is_none();

    let mut tables_with_rows = Vec::new();
    if slot_needed {
        for table in tables {
            let sql = format!("SELECT EXISTS (SELECT 1 FROM {})", table.quoted());
            if client.query_one(&sql, &[]).await?.get::<_, bool>(0) {
                tables_with_rows.push(table.clone());
            }
        }
    }

    let change = ensure_publication(client, publication, tables).await?;
    if slot_needed && let Err(error) = create_slot(client, slot).await {
        undo_publication_change(client, publication, &change).await;
        return Err(error);
    }
    Ok(SetupReport {
        slot_created: slot_needed,
        publication_created: change == PublicationChange::Created,
        tables_with_rows,
    })
}

async fn create_slot(client: &Client, slot: &str) -> Result<(), ReplicationError> {
    client
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map(drop)
        .map_err(|error| match error.as_db_error() {
            // configuration_limit_exceeded: no free slot.
            Some(db) if db.code().code() == "53400" => {
                ReplicationError::SlotsExhausted(ServerError::from_db_error(db))
            }
            _ => error.into(),
        })
}

/// What [`ensure_publication`] changed, so a failed setup can take it back.
#[derive(Debug, PartialEq, Eq)]
enum PublicationChange {
    /// It existed and covered the tables already.
    None,
    /// It did not exist.
    Created,
    /// It existed; these tables were added to it.
    Extended(Vec<TableName>),
}

/// Takes back `change`, best effort: the setup already failed, and its error is the one to
/// report; a leftover is logged with the way to remove it.
async fn undo_publication_change(client: &Client, publication: &str, change: &PublicationChange) {
    let sql = match change {
        PublicationChange::None => return,
        PublicationChange::Created => {
            format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_identifier(publication)
            )
        }
        PublicationChange::Extended(tables) => format!(
            "ALTER PUBLICATION {} DROP TABLE {}",
            quote_identifier(publication),
            table_list(tables)
        ),
    };
    if let Err(error) = client.batch_execute(&sql).await {
        tracing::warn!(
            %publication,
            %error,
            "setup failed and could not undo its change to the publication; \
             run pgstream-host teardown (or {sql}) to remove it"
        );
    }
}

/// `"schema"."table", ...`, for SQL.
fn table_list<'a>(tables: impl IntoIterator<Item = &'a TableName>) -> String {
    tables
        .into_iter()
        .map(TableName::quoted)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates the publication, or adds the tables it lacks.
async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[TableName],
) -> Result<PublicationChange, ReplicationError> {
    let existing = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    match existing {
        None => {
            let sql = if tables.is_empty() {
                format!("CREATE PUBLICATION {}", quote_identifier(publication))
            } else {
                format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    quote_identifier(publication),
                    table_list(tables)
                )
            };
            client.batch_execute(&sql).await?;
            Ok(PublicationChange::Created)
        }
        Some(row) if row.get::<_, bool>(0) => Ok(PublicationChange::None),
        Some(_) => {
            let published: Vec<TableName> = client
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[&publication],
                )
                .await?
                .iter()
                .map(|row| TableName { schema: row.get(0), name: row.get(1) })
                .collect();
            let missing: Vec<TableName> = tables
                .iter()
                .filter(|table| !published.contains(table))
                .cloned()
                .collect();
            if missing.is_empty() {
                return Ok(PublicationChange::None);
            }
            let sql = format!(
                "ALTER PUBLICATION {} ADD TABLE {}",
                quote_identifier(publication),
                table_list(&missing)
            );
            client.batch_execute(&sql).await?;
            Ok(PublicationChange::Extended(missing))
        }
    }
}

/// What [`teardown`] dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TeardownReport {
    /// The slot existed and was dropped.
    pub slot_dropped: bool,
    /// The publication existed and was dropped.
    pub publication_dropped: bool,
}

/// Drops the slot and the publication if they exist, and says which did. Idempotent. Refuses
/// (with [`ReplicationError::SlotActive`]) while a consumer is attached to the slot, and names
/// that [`setup`] would refuse.
pub async fn teardown(
    client: &Client,
    slot: &str,
    publication: &str,
) -> Result<TeardownReport, ReplicationError> {
    validate_slot_name(slot)?;
    validate_publication_name(publication)?;
    let existing = client
        .query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    if let Some(row) = &existing {
        if let Some(pid) = row.get::<_, Option<i32>>(0) {
            return Err(ReplicationError::SlotActive {
                slot: slot.to_owned(),
                pid,
            });
        }
        client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await?;
    }
    let publication_exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?
        .is_some();
    if publication_exists {
        client
            .batch_execute(&format!(
                "DROP PUBLICATION IF EXISTS {}",
                quote_identifier(publication)
            ))
            .await?;
    }
    Ok(TeardownReport {
        slot_dropped: existing.is_some(),
        publication_dropped: publication_exists,
    })
}

/// The slot's `confirmed_flush_lsn`, or `None` if there is no such slot (or it is physical).
pub async fn slot_confirmed_flush_lsn(
    client: &Client,
    slot: &str,
) -> Result<Option<Lsn>, ReplicationError> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    let Some(text) = row.and_then(|row| row.get::<_, Option<String>>(0)) else {
        return Ok(None);
    };
    text.parse()
        .map(Some)
        .map_err(|_| ReplicationError::Protocol(format!("server returned unparsable LSN {text:?}")))
}

/// How much WAL a slot holds back, as `pg_replication_slots` reports it (Postgres 13+).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotWal {
    /// `reserved`, `extended`, `unreserved` (the next checkpoint may remove WAL the slot needs)
    /// or `lost` (it has: the slot is invalidated and can stream no more).
    pub wal_status: Option<String>,
    /// Bytes of WAL retained for the slot: the server's WAL position minus its `restart_lsn`.
    pub retained_bytes: Option<i64>,
    /// Bytes that can still be written before the slot is in danger of being lost; `None`
    /// when `max_slot_wal_keep_size` is unlimited.
    pub safe_wal_size: Option<i64>,
    /// Replication lag: the server's WAL position minus the slot's confirmed position.
    pub lag_bytes: Option<i64>,
}

impl SlotWal {
    /// The slot has been invalidated.
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }

    /// The slot is at risk: WAL it needs may be removed at the next checkpoint, or it holds
    /// more than half of what `max_slot_wal_keep_size` lets it retain.
    pub fn is_at_risk(&self) -> bool {
        if self.wal_status.as_deref() == Some("unreserved") {
            return true;
        }
        match (self.retained_bytes, self.safe_wal_size) {
            (Some(retained), Some(safe)) => retained >= safe,
            _ => false,
        }
    }
}

/// The slot's hold on WAL, or `None` when there is no such slot.
pub async fn slot_wal(client: &Client, slot: &str) -> Result<Option<SlotWal>, ReplicationError> {
    let row = client
        .query_opt(
            // A standby (logical decoding there needs Postgres 16) has no current WAL
            // position of its own: its replay position stands in.
            "WITH server AS (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() \
             ELSE pg_current_wal_lsn() END AS lsn) \
             SELECT wal_status, (server.lsn - restart_lsn)::bigint, safe_wal_size, \
             (server.lsn - confirmed_flush_lsn)::bigint \
             FROM pg_replication_slots, server WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|row| SlotWal {
        wal_status: row.get(0),
        retained_bytes: row.get(1),
        safe_wal_size: row.get(2),
        lag_bytes: row.get(3),
    }))
}

/// A reason the source cannot be replicated, with the fix in the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreflightError {
    /// Logical decoding is off.
    #[error(
        "wal_level is {current:?} but logical replication needs \"logical\": run ALTER SYSTEM SET wal_level = logical; then restart Postgres"
    )]
    WalLevel {
        /// The current setting.
        current: String,
    },
    /// The role may not open replication connections.
    #[error("role {role:?} lacks the REPLICATION attribute: run ALTER ROLE {role_sql} REPLICATION; as a superuser", role_sql = quote_identifier(role))]
    MissingReplicationRole {
        /// The connected role.
        role: String,
    },
    /// A configured table does not exist.
    #[error(
        "table {table} does not exist (or is not visible to this role): create it or fix the table name"
    )]
    TableMissing {
        /// The table.
        table: TableName,
    },
    /// Updates and deletes on the table would carry no key.
    #[error("table {table} has no primary key and no replica identity, so updates and deletes cannot be replicated: add a primary key or run ALTER TABLE {quoted} REPLICA IDENTITY FULL;", quoted = table.quoted())]
    NoReplicaIdentity {
        /// The table.
        table: TableName,
    },
    /// Replication is configured off entirely.
    #[error(
        "{setting} is 0, so no replication connection or slot is possible: run ALTER SYSTEM SET {setting} = 10; then restart Postgres"
    )]
    ReplicationDisabled {
        /// `max_replication_slots` or `max_wal_senders`.
        setting: &'static str,
    },
    /// Every walsender slot is busy.
    #[error(
        "all {max} max_wal_senders are in use: stop an idle replication client or raise max_wal_senders and restart Postgres"
    )]
    WalSendersExhausted {
        /// The setting's value.
        max: i64,
    },
    /// The checks themselves failed.
    #[error("preflight query failed")]
    Sql(#[from] tokio_postgres::Error),
}

/// Checks that logical replication of `tables` can work with this server and role, and says
/// how to fix it when not. Runs read-only catalog queries.
pub async fn preflight(client: &Client, tables: &[TableName]) -> Result<(), PreflightError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), \
                    current_setting('max_replication_slots')::int8, \
                    current_setting('max_wal_senders')::int8, \
                    (SELECT count(*) FROM pg_stat_replication), \
                    current_user::text, \
                    (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)",
            &[],
        )
        .await?;
    let wal_level: String = row.get(0);
    if wal_level != "logical" {
        return Err(PreflightError::WalLevel { current: wal_level });
    }
    let (max_slots, max_senders, senders): (i64, i64, i64) = (row.get(1), row.get(2), row.get(3));
    if max_slots == 0 {
        return Err(PreflightError::ReplicationDisabled {
            setting: "max_replication_slots",
        });
    }
    if max_senders == 0 {
        return Err(PreflightError::ReplicationDisabled {
            setting: "max_wal_senders",
        });
    }
    if senders >= max_senders {
        return Err(PreflightError::WalSendersExhausted { max: max_senders });
    }
    if !row.get::<_, Option<bool>>(5).unwrap_or(false) {
        return Err(PreflightError::MissingReplicationRole { role: row.get(4) });
    }
    for table in tables {
        let row = client
            .query_opt(
                "SELECT c.relreplident::text, \
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&table.schema, &table.name],
            )
            .await?;
        let Some(row) = row else {
            return Err(PreflightError::TableMissing {
                table: table.clone(),
            });
        };
        let identity: String = row.get(0);
        let has_primary_key: bool = row.get(1);
        // 'd' = default (the primary key), 'n' = nothing, 'f' = full row, 'i' = chosen index.
        let identified = match identity.as_str() {
            "d" => has_primary_key,
            "n" => false,
            _ => true,
        };
        if !identified {
            return Err(PreflightError::NoReplicaIdentity {
                table: table.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(schema: &str, name: &str) -> TableName {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    #[test]
    fn parses_plain_qualified_and_quoted_names() {
        assert_eq!("docs".parse(), Ok(table("public", "docs")));
        assert_eq!("Sales.Orders".parse(), Ok(table("sales", "orders")));
        assert_eq!(
            "\"My Schema\".\"Docs\"".parse(),
            Ok(table("My Schema", "Docs"))
        );
        assert_eq!("\"a.b\"".parse(), Ok(table("public", "a.b")));
        assert_eq!("s.\"say \"\"hi\"\"\"".parse(), Ok(table("s", "say \"hi\"")));
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "\"open",
            "\"a\"b",
            "two words",
            "a\"b",
        ] {
            assert!(bad.parse::<TableName>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn display_quotes_only_when_needed_and_round_trips() {
        assert_eq!(table("public", "docs").to_string(), "public.docs");
        assert_eq!(
            table("My Schema", "Docs").to_string(),
            "\"My Schema\".\"Docs\""
        );
        assert_eq!(table("s", "a.b").to_string(), "s.\"a.b\"");
        assert_eq!(table("s", "1st").to_string(), "s.\"1st\"");
        for name in [
            table("My Schema", "Docs"),
            table("s", "say \"hi\""),
            table("public", "x_1"),
        ] {
            assert_eq!(name.to_string().parse(), Ok(name.clone()));
        }
        assert_eq!(table("s", "a\"b").quoted(), "\"s\".\"a\"\"b\"");
    }
}
