//! What the CLI does on a data directory when no node runs there: found a fleet (the node joins
//! it when it starts) and sign access tokens with the admin key kept there.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use shoal_node::auth::{ADMIN_KEY_FILE, FleetConfig, now_ms};
use shoal_node::identity::{Identity, read_secret, write_secret};
use shoal_node::registry::admin;
use shoal_protocol::SigningKey;
use shoal_protocol::fleet::{
    AccessToken, Actions, FleetId, JoinTicket, JoinToken, Name, ObjectId, RepoPattern, Scope,
    Signed,
};

/// How long a join token lasts unless told otherwise.
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ticket(
    admin: &SigningKey,
    fleet: FleetId,
    groups: Vec<Name>,
    ttl: Duration,
) -> anyhow::Result<Signed<JoinTicket>> {
    let now = now_ms();
    Ok(Signed::sign(
        &JoinTicket {
            fleet,
            id: ObjectId::from_bytes(rand::random()),
            groups,
            issued_ms: now,
            expires_ms: now.saturating_add(millis(ttl)),
            admin: admin.public(),
        },
        admin,
    )?)
}

/// `shoal fleet init` with no node running: the admin key, the fleet file (this node a member,
/// enrolled by itself when it starts), and a join token for the others (without addresses: give
/// them `--peer`, or let mDNS find the node on a LAN).
pub fn fleet_init(
    data_dir: &Path,
    ttl: Option<Duration>,
    groups: Vec<String>,
    others: &[String],
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        FleetConfig::read(data_dir)?.is_none(),
        "{} belongs to a fleet already",
        data_dir.display()
    );
    std::fs::create_dir_all(data_dir)?;
    Identity::load_or_create(data_dir)?;
    let admin = SigningKey::from_seed(rand::random());
    let admins = admin::fleet_admins(admin.public(), others).map_err(anyhow::Error::msg)?;
    write_secret(&data_dir.join(ADMIN_KEY_FILE), &admin.seed()).context("writing the admin key")?;
    let fleet = FleetId::founded_by(&admin.public());
    let groups = groups
        .iter()
        .map(|g| g.parse::<Name>())
        .collect::<Result<Vec<_>, _>>()?;
    FleetConfig {
        id: fleet,
        admins: admins.clone(),
        ticket: Some(ticket(&admin, fleet, Vec::new(), DEFAULT_TTL)?),
        bootstrap: Vec::new(),
    }
    .write(data_dir)?;
    let token = JoinToken {
        fleet,
        admins,
        bootstrap: Vec::new(),
        ticket: ticket(&admin, fleet, groups, ttl.unwrap_or(DEFAULT_TTL))?,
    };
    eprintln!(
        "founded {fleet}; {} holds its admin key",
        data_dir.display()
    );
    eprintln!(
        "the token carries no address: start the others with --peer, or let mDNS find this node"
    );
    println!("{}", token.to_text());
    Ok(ExitCode::SUCCESS)
}

/// `shoal keys admin`: makes an admin key in `data_dir` (or shows the one there) and prints its
/// public key, for the founder's `shoal fleet init --admin KEY`. The node running on `data_dir`
/// picks it up when it restarts.
pub fn admin_key(data_dir: &Path) -> anyhow::Result<ExitCode> {
    let path = data_dir.join(ADMIN_KEY_FILE);
    let key = if let Some(seed) = read_secret(&path).context("reading the admin key")? {
        SigningKey::from_seed(seed)
    } else {
        std::fs::create_dir_all(data_dir)?;
        let key = SigningKey::from_seed(rand::random());
        write_secret(&path, &key.seed()).context("writing the admin key")?;
        eprintln!("made an admin key in {}", path.display());
        key
    };
    eprintln!(
        "found the fleet with: shoal fleet init --admin {}",
        key.public()
    );
    println!("{}", key.public());
    Ok(ExitCode::SUCCESS)
}

/// `shoal token create` with no node running: signed with the admin key in `data_dir`.
pub fn token(data_dir: &Path, request: &admin::TokenRequest) -> anyhow::Result<admin::TokenAnswer> {
    let fleet = FleetConfig::read(data_dir)?
        .with_context(|| format!("{} belongs to no fleet", data_dir.display()))?;
    let seed = read_secret(&data_dir.join(ADMIN_KEY_FILE))?
        .with_context(|| format!("{} holds no admin key", data_dir.display()))?;
    let admin = SigningKey::from_seed(seed);
    anyhow::ensure!(
        fleet.admins.contains(&admin.public()),
        "the admin key in {} is not one of its fleet's",
        data_dir.display()
    );
    let scopes = request
        .scopes
        .iter()
        .map(|(repos, actions)| {
            Ok(Scope {
                repos: repos.parse::<RepoPattern>()?,
                actions: actions.parse::<Actions>()?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let now = now_ms();
    let token = AccessToken {
        fleet: fleet.id,
        id: ObjectId::from_bytes(rand::random()),
        principal: request.principal.parse()?,
        scopes,
        issued_ms: now,
        expires_ms: now.saturating_add(request.ttl_secs.saturating_mul(1000)),
        admin: admin.public(),
    };
    let signed = Signed::sign(&token, &admin)?;
    Ok(admin::TokenAnswer {
        token: signed.to_text(),
        id: token.id.to_string(),
        expires_ms: token.expires_ms,
    })
}
