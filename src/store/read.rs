//! Reading the store's rows: what changed above a version, each tenant whole.

use super::db::{Conn, Db, DbError, Val};
use super::{KeyRec, TenantRec};

/// Above this many changed tenants a read takes the whole store in one pass instead
/// of each changed tenant by id (an import, a node that was away for long).
const FULL_READ_ABOVE: usize = 1_000;

/// Emits each tenant that changed above version `since` (every tenant when `since`
/// is 0), whole: its row and all its keys, so it can be rebuilt from what is emitted
/// alone. One consistent snapshot of the database; tenants are emitted one at a time
/// as their rows stream in, so a load of the whole store never holds it all as rows.
pub async fn read_changes(
    db: &Db,
    since: i64,
    emit: impl FnMut(TenantRec) + Send,
) -> Result<super::Read, DbError> {
    let mut conn = db.connect().await?;
    conn.begin_read().await?;
    let r = read_in(&mut conn, since, emit).await;
    match r {
        Ok(read) => {
            conn.commit().await?;
            db.release(conn);
            Ok(read)
        }
        Err(e) => {
            conn.rollback().await;
            Err(e)
        }
    }
}

const JOINED: &str = "SELECT t.id, t.spec, t.disabled, t.created_ms, t.updated_ms, \
    k.id, k.spec, k.created_ms, k.updated_ms, k.revoked_ms \
    FROM gw_tenants t LEFT JOIN gw_keys k ON k.tenant = t.id";

async fn read_in(
    conn: &mut Conn,
    since: i64,
    mut emit: impl FnMut(TenantRec) + Send,
) -> Result<super::Read, DbError> {
    let v = conn
        .query("SELECT version FROM gw_meta WHERE id = 1", &[])
        .await?;
    let version = v.first().and_then(|r| r[0].int()).unwrap_or(0);
    if version <= since && since > 0 {
        return Ok(super::Read {
            version,
            full: false,
        });
    }
    let mut ids: Vec<String> = Vec::new();
    if since > 0 {
        let params = [Val::Int(since), Val::Int(version)];
        for r in conn
            .query(
                "SELECT id FROM gw_tenants WHERE version > $1 AND version <= $2 \
                 UNION SELECT tenant FROM gw_keys WHERE version > $1 AND version <= $2",
                &params,
            )
            .await?
        {
            ids.push(text(&r, 0));
        }
    }
    let full = since == 0 || ids.len() > FULL_READ_ABOVE;
    let mut cur: Option<TenantRec> = None;
    let mut on_row = |r: &[Val]| {
        let id = r.first().and_then(Val::text).unwrap_or("");
        if cur.as_ref().is_some_and(|c| c.id != id) {
            if let Some(done) = cur.take() {
                emit(done);
            }
        }
        let rec = cur.get_or_insert_with(|| tenant_rec(r));
        if r.get(5).and_then(Val::text).is_some() {
            rec.keys.push(key_rec(&r[5..]));
        }
    };
    if full {
        conn.for_each(&format!("{JOINED} ORDER BY t.id, k.id"), &[], &mut on_row)
            .await?;
    } else {
        for chunk in ids.chunks(100) {
            let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let params: Vec<Val> = chunk.iter().map(|id| Val::Text(id.clone())).collect();
            conn.for_each(
                &format!(
                    "{JOINED} WHERE t.id IN ({}) ORDER BY t.id, k.id",
                    marks.join(", ")
                ),
                &params,
                &mut on_row,
            )
            .await?;
        }
    }
    if let Some(done) = cur.take() {
        emit(done);
    }
    Ok(super::Read { version, full })
}

pub(super) fn text(r: &[Val], i: usize) -> String {
    r.get(i).and_then(Val::text).unwrap_or("").to_string()
}

pub(super) fn int(r: &[Val], i: usize) -> i64 {
    r.get(i).and_then(Val::int).unwrap_or(0)
}

pub(super) fn tenant_rec(r: &[Val]) -> TenantRec {
    TenantRec {
        id: text(r, 0),
        spec: text(r, 1),
        disabled: int(r, 2) != 0,
        created_ms: int(r, 3),
        updated_ms: int(r, 4),
        keys: Vec::new(),
    }
}

/// `id, spec, created_ms, updated_ms, revoked_ms`.
pub(super) fn key_rec(r: &[Val]) -> KeyRec {
    KeyRec {
        id: text(r, 0),
        spec: text(r, 1),
        created_ms: int(r, 2),
        updated_ms: int(r, 3),
        revoked_ms: r.get(4).and_then(Val::int),
    }
}
