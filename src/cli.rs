//! The `longshore` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::bundle::write::{self, CreateOptions, SourceArg};
use crate::config::{human_size, Settings};
use crate::engine::{self, Engine, ImportOptions};
use crate::oci::digest::Digest;
use crate::paths::HostPaths;
use crate::report;

pub use crate::error::{EXIT_NO_SPACE, EXIT_REJECTED};

/// Brings container images onto CRI-O nodes from bundles, verified, without a registry.
#[derive(Debug, Parser)]
#[command(name = "longshore", version, about, long_about = None)]
pub struct Cli {
    /// Take every host path (configuration, state, the image store, CRI-O's drop-ins)
    /// under DIR; for tests and demos, never needed on a node.
    #[arg(long, global = true, value_name = "DIR", env = "LONGSHORE_SYSROOT")]
    pub sysroot: Option<PathBuf>,
    /// Log more (debug level).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Verify a bundle (or image archive or layout) and copy its images into the store.
    Import(ImportArgs),
    /// Check a bundle without importing it.
    Verify(VerifyArgs),
    /// Import a bundle that was held with `import --hold`.
    Apply {
        /// The bundle's name or digest.
        bundle: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show bundles, image sets and images, and whether the store holds them.
    Status {
        /// Print JSON (a stable interface; see docs/status-json.md).
        #[arg(long)]
        json: bool,
    },
    /// List image sets and their state, or remove one.
    Sets {
        #[command(subcommand)]
        action: Option<SetsCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the cache of original blobs: its size, what it holds, what keeps each bundle
    /// in it (see docs/cache.md).
    Cache {
        #[command(subcommand)]
        action: Option<CacheCommand>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Sharing the cache with this node's CRI-O and the cluster's nodes (see
    /// docs/sharing.md).
    Share {
        #[command(subcommand)]
        action: ShareCommand,
    },
    /// Fetch what set files name from registries into the cache (as CRI-O would pull
    /// it: registries.conf, the pull secret, certs.d, policy.json), then import and pin
    /// it (see docs/fetching.md). Runs now, whatever `[fetch] windows` says.
    Fetch {
        /// The sets to fetch (set file names); every set file that fetches when none is
        /// given.
        sets: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check every set, put back from the cache what the store lost, and bring
    /// CRI-O's pins in line (what the daemon does at start).
    Sync,
    /// Run the daemon (longshore.service): import what bundle media carry when they are
    /// plugged in, keep CRI-O's pins in line with the image sets, heal the store when
    /// CRI-O (re)starts, and serve io.longshore.Longshore1 on D-Bus.
    ///
    /// It reports to systemd (Type=notify): READY=1 once the critical image sets on the
    /// media present at boot are in, STATUS= lines, watchdog pings. Logs go to the
    /// journal. See docs/media.md, docs/dbus-api.md and docs/journal.md.
    Daemon,
    /// Make bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Render what installs longshore: Ignition, MachineConfigs, man pages, completions.
    #[command(subcommand)]
    Generate(GenerateCommand),
}

#[derive(Debug, Subcommand)]
enum GenerateCommand {
    /// Print an Ignition config that installs longshore on an RHEL CoreOS node at first
    /// boot (or its Butane source, with --butane).
    Ignition {
        #[command(flatten)]
        node: NodeArgs,
        /// Print the Butane source instead.
        #[arg(long)]
        butane: bool,
    },
    /// Print MachineConfig manifests that install longshore on a cluster's nodes (day 2),
    /// one per --role.
    Machineconfig {
        #[command(flatten)]
        node: NodeArgs,
        /// The machine config pools (default: worker and master).
        #[arg(long = "role", value_name = "R")]
        roles: Vec<String>,
    },
    /// Write the man pages into DIR.
    Man {
        /// The directory (made if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Print the completion script for SHELL.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
struct NodeArgs {
    /// Where nodes fetch the binary (http:// or https://).
    #[arg(long, value_name = "URL")]
    binary_url: String,
    /// The binary served at that URL, whose SHA-512 nodes check (default: this one).
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
    /// Its SHA-512 (hex), instead of reading --binary.
    #[arg(long, value_name = "HEX", conflicts_with = "binary")]
    binary_sha512: Option<String>,
    /// A configuration fragment, installed as /etc/longshore/config.d/50-site.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A set file, installed into /etc/longshore/sets.d/ (repeatable).
    #[arg(long = "set", value_name = "FILE")]
    sets: Vec<PathBuf>,
    /// The Ignition spec version: 3.3.0, which every supported RHEL CoreOS reads, or 3.4.0.
    #[arg(long, value_name = "VERSION", default_value = "3.3.0")]
    ignition_version: String,
}

impl NodeArgs {
    fn node_config(&self) -> Result<crate::install::NodeConfig> {
        use crate::install::NodeConfig;
        let mut c = match &self.binary_sha512 {
            Some(hex) => {
                if hex.len() != 128 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    anyhow::bail!("--binary-sha512: 128 hex digits expected");
                }
                NodeConfig {
                    binary_url: self.binary_url.clone(),
                    binary_sha512: hex.to_ascii_lowercase(),
                    ignition_version: String::new(),
                    extra: vec![],
                }
            }
            None => {
                let binary = match &self.binary {
                    Some(b) => b.clone(),
                    None => crate::install::this_binary()?,
                };
                NodeConfig::for_binary(&self.binary_url, &binary)?
            }
        };
        c.ignition_version = self.ignition_version.clone();
        if let Some(f) = &self.config {
            c = c.with_config(f)?;
        }
        for f in &self.sets {
            c = c.with_set(f)?;
        }
        Ok(c)
    }
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Evict now what nothing references, oldest first, down to `[cache] max_size` and
    /// while the filesystem is below `[store] min_free_space`.
    Gc {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ShareCommand {
    /// Make a new cluster key: 32 random bytes in the format libp2p reads too. Copy the
    /// same file to every node (a MachineConfig), readable by root only.
    Keygen {
        /// Write it to this file (created with mode 0600; an existing file is refused)
        /// instead of printing it.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum SetsCommand {
    /// Remove a set that came from a bundle: its images are no longer pinned (they stay
    /// in the store until CRI-O's garbage collection removes them).
    Remove {
        /// The set's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// A bundle directory, a tar bundle (.tar, .tar.gz, .tar.zst or a device), an image
    /// archive or layout, or a directory holding several.
    path: PathBuf,
    /// Refuse the bundle unless its digest is this one.
    #[arg(long, value_name = "sha256:…")]
    digest: Option<Digest>,
    /// Verify and stage only; copy into the store on `longshore apply`.
    #[arg(long)]
    hold: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct VerifyArgs {
    /// What to check (as for import).
    path: PathBuf,
    /// Refuse the bundle unless its digest is this one.
    #[arg(long, value_name = "sha256:…")]
    digest: Option<Digest>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Make a bundle from images in any source skopeo reads.
    Create(CreateArgs),
}

#[derive(Debug, Args)]
struct CreateArgs {
    /// Where to write it: a directory, or a tar stream when the name ends in .tar, .tar.gz
    /// or .tar.zst.
    #[arg(short, long, value_name = "OUT")]
    output: PathBuf,
    /// The bundle's name (default: from OUT).
    #[arg(long)]
    name: Option<String>,
    /// The bundle's version.
    #[arg(long)]
    version: Option<String>,
    /// The name of the image set holding every image (default: the bundle's name).
    #[arg(long = "set", value_name = "NAME")]
    set: Option<String>,
    /// Do not ask for the images to be pinned in CRI-O.
    #[arg(long)]
    no_pin: bool,
    /// Mark the set critical: a node's daemon imports it from media present at boot
    /// before it reports ready, so CRI-O and kubelet start with it in place.
    #[arg(long)]
    critical: bool,
    /// Require HTTPS and verified certificates from registries (`false` for a mirror
    /// that speaks plain HTTP).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    tls_verify: bool,
    /// A whole OpenShift upgrade: the release image (by digest, or by tag) and every
    /// payload image its release-manifests/image-references names, taken from this
    /// node's cache where it holds them whole, else from their registries.
    #[arg(long, value_name = "PULLSPEC")]
    release: Option<String>,
    /// Images: oci:DIR:REF, oci-archive:FILE[:REF], docker-archive:FILE, dir:DIR,
    /// containers-storage:REF, docker://REF, or cache:REF for an image this node's cache
    /// holds; append =REGISTRY/REPO:TAG to name one.
    #[arg(required_unless_present = "release", value_name = "SOURCE")]
    sources: Vec<SourceArg>,
}

/// Parses the command line and runs it.
pub fn run() -> Result<ExitCode> {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    // skopeo wants absolute store paths, so a relative --sysroot is made absolute here.
    let sysroot = match &cli.sysroot {
        Some(p) => std::path::absolute(p)
            .with_context(|| format!("resolving --sysroot {}", p.display()))?,
        None => PathBuf::from("/"),
    };
    let paths = HostPaths::new(&sysroot);
    // Two workers: the copies block a thread while skopeo runs (see engine), and the
    // daemon's D-Bus service must keep answering meanwhile.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(dispatch(cli.command, paths))
}

async fn dispatch(cmd: Command, paths: HostPaths) -> Result<ExitCode> {
    // Rendering reads no node configuration: it runs on an administrator's machine.
    if let Command::Generate(g) = cmd {
        return generate(g);
    }
    let settings = Settings::load(&paths)?;
    match cmd {
        Command::Import(a) => {
            if let Some(conn) = daemon_connection(&settings).await {
                return via_daemon::import(&conn, &a).await;
            }
            let mut engine = Engine::open(paths, settings)?;
            let shown = show_progress(&mut engine);
            let opts = ImportOptions {
                expected: a.digest,
                hold: a.hold,
                restore: false,
            };
            let outcome = engine.import(&a.path, &opts).await;
            drop(engine);
            let _ = shown.await;
            let outcome = outcome?;
            if a.json {
                print_json(&outcome.reports)?;
            } else {
                for r in &outcome.reports {
                    println!("{}", r.summary());
                }
            }
            if let Some((_, first)) = outcome.failures.first() {
                let code = exit_code_for(first);
                for (path, e) in &outcome.failures {
                    eprintln!("error: {}: {e:#}", path.display());
                }
                eprintln!(
                    "{} of {} inputs in {} failed",
                    outcome.failures.len(),
                    outcome.failures.len() + outcome.reports.len(),
                    a.path.display()
                );
                return Ok(ExitCode::from(code));
            }
        }
        Command::Verify(a) => {
            let reports =
                engine::verify(&a.path, a.digest, &settings, &paths, &Default::default()).await?;
            if a.json {
                print_json(&reports)?;
            } else {
                for r in &reports {
                    println!(
                        "{}: bundle {} ({}) is intact: {} images, {} verified",
                        r.path.display(),
                        r.name,
                        r.digest,
                        r.images,
                        human_size(r.bytes_verified)
                    );
                }
            }
        }
        Command::Apply { bundle, json } => {
            if let Some(conn) = daemon_connection(&settings).await {
                return via_daemon::apply(&conn, &bundle, json).await;
            }
            let mut engine = Engine::open(paths, settings)?;
            let shown = show_progress(&mut engine);
            let r = engine.apply(&bundle).await;
            drop(engine);
            let _ = shown.await;
            let r = r?;
            if json {
                print_json(&r)?;
            } else {
                println!("{}", r.summary());
            }
        }
        Command::Status { json } => {
            if let Some(conn) = daemon_connection(&settings).await {
                return via_daemon::show(&conn, "Status", json).await;
            }
            let status = report::status(&paths, &settings).await?;
            if json {
                print_json(&status)?;
            } else {
                print!("{}", report::render_status(&status));
            }
        }
        Command::Sets {
            action: Some(SetsCommand::Remove { name }),
            ..
        } => {
            if let Some(conn) = daemon_connection(&settings).await {
                return via_daemon::remove_set(&conn, &name).await;
            }
            let mut engine = Engine::open(paths, settings)?;
            engine.remove_set(&name).await?;
            println!("removed set {name}: its images are no longer pinned");
        }
        Command::Sets { action: None, json } => {
            if let Some(conn) = daemon_connection(&settings).await {
                return via_daemon::show(&conn, "Sets", json).await;
            }
            let views = report::sets(&paths, &settings).await?;
            if json {
                print_json(&report::sets_json(&views))?;
            } else {
                print!("{}", report::render_sets(&views));
            }
        }
        Command::Cache {
            action: Some(CacheCommand::Gc { json }),
            ..
        } => {
            let done = match daemon_connection(&settings).await {
                Some(conn) => match via_daemon::collect_cache(&conn).await? {
                    Ok(done) => done,
                    Err(code) => return Ok(code),
                },
                None => Engine::open(paths, settings)?.collect_cache()?,
            };
            if json {
                print_json(&done)?;
            } else {
                println!(
                    "cache collected: {} blobs evicted, {} freed; {} left ({} blobs referenced, {} unreferenced within the limits)",
                    done.evicted,
                    human_size(done.freed),
                    human_size(done.bytes),
                    done.referenced,
                    done.unreferenced
                );
            }
        }
        Command::Cache { action: None, json } => {
            if let Some(conn) = daemon_connection(&settings).await {
                return via_daemon::show(&conn, "Cache", json).await;
            }
            let r = engine::cache_report(&paths, &settings)?;
            if json {
                print_json(&r)?;
            } else {
                print!("{}", r.render());
            }
        }
        Command::Share {
            action: ShareCommand::Keygen { output },
        } => {
            let key = crate::share::auth::ClusterKey::generate()?;
            match output {
                None => print!("{key}"),
                Some(p) => {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&p)
                        .with_context(|| format!("creating {}", p.display()))?;
                    f.write_all(key.as_bytes())
                        .and_then(|_| f.sync_all())
                        .with_context(|| format!("writing {}", p.display()))?;
                    eprintln!("wrote a new cluster key to {}", p.display());
                }
            }
        }
        Command::Fetch { sets, json } => {
            let report = match daemon_connection(&settings).await {
                Some(conn) => match via_daemon::fetch(&conn, &sets).await? {
                    Ok(r) => r,
                    Err(code) => return Ok(code),
                },
                None => {
                    let mut engine = Engine::open(paths, settings)?;
                    let display = crate::progress::Display::stderr(false);
                    let on_board = |b: &crate::fetch::Board| {
                        for p in board_progress(b) {
                            display.step(&p);
                        }
                    };
                    let opts = crate::fetch::Options {
                        ignore_windows: true,
                    };
                    let r = engine.fetch(&sets, &opts, &on_board).await;
                    display.finish();
                    serde_json::to_value(r?)?
                }
            };
            return fetch_result(&report, json);
        }
        Command::Sync => {
            let mut engine = Engine::open(paths, settings)?;
            let views = engine.heal().await?;
            print!("{}", report::render_sets(&views));
        }
        Command::Daemon => {
            crate::daemon::run(paths, settings).await?;
        }
        Command::Generate(_) => unreachable!("handled above"),
        Command::Bundle(BundleCommand::Create(a)) => {
            let name = match a.name {
                Some(n) => n,
                None => crate::bundle::foreign::implicit_name(&a.output),
            };
            let cache = crate::cache::Cache::new(paths.cache_dir());
            let mut sources = a.sources.clone();
            let mut version = a.version;
            if let Some(release) = &a.release {
                let payload = match crate::release::from_cache(&cache, release) {
                    Ok(p) => p,
                    Err(_) => {
                        write::release_payload(release, &settings.skopeo, a.tls_verify).await?
                    }
                };
                tracing::info!(
                    "release {release} ({}): {} payload images",
                    payload.version,
                    payload.images.len()
                );
                version = version.or(Some(payload.version.clone()));
                for r in std::iter::once(release).chain(&payload.images) {
                    // Each from the cache when it holds it whole, else from its registry.
                    let source = if cache.complete(r).is_some() {
                        format!("cache:{r}")
                    } else {
                        format!("docker://{r}")
                    };
                    sources.push(SourceArg {
                        source,
                        name: Some(r.clone()),
                    });
                }
            }
            let opts = CreateOptions {
                set: a.set.unwrap_or_else(|| name.clone()),
                name,
                version,
                pinned: !a.no_pin,
                critical: a.critical,
                tls_verify: a.tls_verify,
            };
            let views = a.output.with_file_name(format!(
                ".{}.views{}",
                a.output
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                std::process::id()
            ));
            let made = write::cache_sources(&cache, &mut sources, &views);
            let res = match made {
                Ok(()) => write::create(&a.output, &sources, &opts, &settings.skopeo).await,
                Err(e) => Err(e),
            };
            let _ = std::fs::remove_dir_all(&views);
            let (digest, meta) = res?;
            println!(
                "wrote bundle {} ({} images) to {}\ndigest {digest}",
                meta.name,
                meta.images.len(),
                a.output.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A connection to the bus when the daemon serves its API there: then commands that
/// change the state go through it, so there is one writer.
fn generate(g: GenerateCommand) -> Result<ExitCode> {
    use clap::CommandFactory;
    match g {
        GenerateCommand::Ignition { node, butane } => {
            let c = node.node_config()?;
            if butane {
                print!("{}", c.butane()?);
            } else {
                print_json(&c.ignition()?)?;
            }
        }
        GenerateCommand::Machineconfig { node, roles } => {
            let c = node.node_config()?;
            let roles = if roles.is_empty() {
                vec!["worker".to_string(), "master".to_string()]
            } else {
                roles
            };
            for (i, role) in roles.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", c.machineconfig(role)?);
            }
        }
        GenerateCommand::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, page) in man_pages(Cli::command()) {
                let path = dir.join(format!("{name}.8"));
                let mut out = Vec::new();
                page.render(&mut out)
                    .with_context(|| format!("rendering {name}(8)"))?;
                std::fs::write(&path, out)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        GenerateCommand::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "longshore", &mut std::io::stdout());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A man page (section 8: longshore is run by the administrator) for the command and
/// each subcommand, named `longshore-SUB[-SUBSUB]`.
fn man_pages(cmd: clap::Command) -> Vec<(String, clap_mangen::Man)> {
    fn walk(cmd: &clap::Command, name: &str, out: &mut Vec<(String, clap_mangen::Man)>) {
        // The synopsis shows the command as it is typed: `longshore bundle create`.
        let typed = name.replace('-', " ");
        let page = clap_mangen::Man::new(cmd.clone().name(name.to_string()).bin_name(typed))
            .section("8")
            .manual("longshore");
        out.push((name.to_string(), page));
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            walk(sub, &format!("{name}-{}", sub.get_name()), out);
        }
    }
    let mut out = Vec::new();
    walk(&cmd, "longshore", &mut out);
    out
}

/// What a fetch board says, as progress steps (one per set).
pub fn board_progress(b: &crate::fetch::Board) -> Vec<crate::events::Progress> {
    b.sets
        .iter()
        // A set none of whose manifests is known yet has nothing to show.
        .filter(|(_, p)| p.total > 0 || p.waiting.is_some())
        .map(|(name, p)| crate::events::Progress {
            bundle: format!("set {name}"),
            image: match (p.eta, &p.waiting) {
                (_, Some(w)) => w.clone(),
                (Some(s), _) => {
                    format!("fetching, about {} left", crate::report::human_duration(s))
                }
                (None, _) => "fetching".to_string(),
            },
            done: p.done,
            total: p.total,
            images: None,
            fetching: true,
        })
        .collect()
}

/// Prints what `longshore fetch` did (the report as JSON, from the engine or the
/// daemon); fails when an image could not be fetched or is still missing.
fn fetch_result(report: &serde_json::Value, json: bool) -> Result<ExitCode> {
    let r: FetchSummary = serde_json::from_value(report.clone())?;
    if json {
        print_json(report)?;
    } else {
        print!("{}", r.text);
    }
    let failed = !r.failures.is_empty() || r.missing > 0;
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// What the command line reads of a fetch report.
#[derive(serde::Deserialize)]
struct FetchSummary {
    text: String,
    failures: serde_json::Map<String, serde_json::Value>,
    missing: usize,
}

/// Shows the engine's copies on stderr (a bar on a terminal) until the engine is
/// dropped; the task ends once the bar is cleared.
fn show_progress(engine: &mut Engine) -> tokio::task::JoinHandle<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine.report_progress(tx);
    tokio::spawn(async move {
        // The log prints a line per image already.
        let display = crate::progress::Display::stderr(true);
        while let Some(p) = rx.recv().await {
            display.step(&p);
        }
    })
}

async fn daemon_connection(settings: &Settings) -> Option<zbus::Connection> {
    let conn = match settings.bus {
        crate::config::Bus::System => zbus::Connection::system().await,
        crate::config::Bus::Session => zbus::Connection::session().await,
    }
    .ok()?;
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.ok()?;
    let name = zbus::names::BusName::try_from(crate::api::BUS_NAME).ok()?;
    let owned = dbus.name_has_owner(name).await.ok()?;
    owned.then(|| {
        tracing::info!("the longshore daemon is running; asking it to do this");
        conn
    })
}

/// The commands that change the state, through the daemon's D-Bus API.
mod via_daemon {
    use std::collections::HashMap;
    use std::process::ExitCode;

    use anyhow::{Context, Result};
    use zbus::zvariant::Value;

    use super::print_json;
    use crate::api::{ImportResult, BUS_NAME, PATH};
    use crate::engine::ImportReport;

    const IFACE: &str = "io.longshore.Longshore1.Manager";

    async fn call<B, R>(
        conn: &zbus::Connection,
        method: &str,
        body: &B,
    ) -> Result<std::result::Result<R, ExitCode>>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
        R: for<'d> serde::Deserialize<'d> + zbus::zvariant::Type,
    {
        match conn
            .call_method(Some(BUS_NAME), PATH, Some(IFACE), method, body)
            .await
        {
            Ok(reply) => Ok(Ok(reply
                .body()
                .deserialize::<R>()
                .with_context(|| format!("reading the daemon's answer to {method}"))?)),
            Err(zbus::Error::MethodError(name, message, _)) => {
                eprintln!("error: {}", message.unwrap_or_else(|| name.to_string()));
                let code = crate::error::ErrorKind::from_dbus_name(name.as_str()).exit_code();
                Ok(Err(ExitCode::from(code)))
            }
            Err(e) => Err(e).with_context(|| format!("calling {method} on the longshore daemon")),
        }
    }

    /// Calls `method` while showing the daemon's `Progress` signals. Signals that
    /// arrived before the reply are shown before it is taken.
    async fn call_showing_progress<B, R>(
        conn: &zbus::Connection,
        method: &str,
        body: &B,
    ) -> Result<std::result::Result<R, ExitCode>>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
        R: for<'d> serde::Deserialize<'d> + zbus::zvariant::Type,
    {
        use futures_util::StreamExt;
        let proxy = zbus::Proxy::new(conn, BUS_NAME, PATH, IFACE).await?;
        let mut signals = proxy.receive_signal("Progress").await?;
        let display = crate::progress::Display::stderr(false);
        let reply = call(conn, method, body);
        tokio::pin!(reply);
        loop {
            tokio::select! {
                biased;
                Some(m) = signals.next() => {
                    if let Ok((bundle, image, done, total)) =
                        m.body().deserialize::<(String, String, u64, u64)>()
                    {
                        display.step(&crate::events::Progress {
                            bundle,
                            // A fetch's steps say how it goes; its copies name an image.
                            fetching: method == "Fetch" && !image.contains('@'),
                            image,
                            done,
                            total,
                            images: None,
                        });
                    }
                }
                res = &mut reply => return res,
            }
        }
    }

    pub async fn import(conn: &zbus::Connection, a: &super::ImportArgs) -> Result<ExitCode> {
        // The daemon resolves paths on its own, from its own working directory.
        let path = std::path::absolute(&a.path)
            .with_context(|| format!("resolving {}", a.path.display()))?;
        let mut options: HashMap<&str, Value> = HashMap::new();
        if a.hold {
            options.insert("hold", Value::from(true));
        }
        if let Some(d) = &a.digest {
            options.insert("digest", Value::from(d.to_string()));
        }
        let path = path.to_string_lossy().into_owned();
        let results: Vec<ImportResult> =
            match call_showing_progress(conn, "Import", &(path, options)).await? {
                Ok(r) => r,
                Err(code) => return Ok(code),
            };
        let reports = results
            .into_iter()
            .map(ImportReport::try_from)
            .collect::<Result<Vec<_>>>()?;
        if a.json {
            print_json(&reports)?;
        } else {
            for r in &reports {
                println!("{}", r.summary());
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    pub async fn apply(conn: &zbus::Connection, bundle: &str, json: bool) -> Result<ExitCode> {
        let result: ImportResult = match call_showing_progress(conn, "Apply", &(bundle,)).await? {
            Ok(r) => r,
            Err(code) => return Ok(code),
        };
        let r = ImportReport::try_from(result)?;
        if json {
            print_json(&r)?;
        } else {
            println!("{}", r.summary());
        }
        Ok(ExitCode::SUCCESS)
    }

    /// `status` or `sets`, as the daemon sees them.
    pub async fn show(conn: &zbus::Connection, method: &str, json: bool) -> Result<ExitCode> {
        let format = if json { "json" } else { "text" };
        match call::<_, String>(conn, method, &(format,)).await? {
            Ok(text) => {
                print!("{text}");
                if !text.ends_with('\n') {
                    println!();
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(code) => Ok(code),
        }
    }

    /// `CollectCache`: what the daemon's collection did.
    pub async fn collect_cache(
        conn: &zbus::Connection,
    ) -> Result<std::result::Result<crate::cache::gc::Collected, ExitCode>> {
        Ok(call::<_, crate::api::Collected>(conn, "CollectCache", &())
            .await?
            .map(Into::into))
    }

    /// `Fetch`: the daemon fetches now and answers with its report (JSON).
    pub async fn fetch(
        conn: &zbus::Connection,
        sets: &[String],
    ) -> Result<std::result::Result<serde_json::Value, ExitCode>> {
        let answer: String = match call_showing_progress(conn, "Fetch", &(sets,)).await? {
            Ok(r) => r,
            Err(code) => return Ok(Err(code)),
        };
        Ok(Ok(
            serde_json::from_str(&answer).context("reading the daemon's fetch report")?
        ))
    }

    pub async fn remove_set(conn: &zbus::Connection, name: &str) -> Result<ExitCode> {
        match call::<_, ()>(conn, "RemoveSet", &(name,)).await? {
            Ok(()) => {
                println!("removed set {name}: its images are no longer pinned");
                Ok(ExitCode::SUCCESS)
            }
            Err(code) => Ok(code),
        }
    }
}

/// The exit code for an error: refused input and lack of space have their own.
pub fn exit_code_for(e: &anyhow::Error) -> u8 {
    crate::error::ErrorKind::of(e).exit_code()
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).context("serialising output")?
    );
    Ok(())
}

fn init_logging(verbose: bool) {
    use tracing_subscriber::prelude::*;
    let level = if verbose { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("LONGSHORE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("longshore={level},warn")));
    // Under systemd, logs go to the journal with their fields; elsewhere to stderr. The
    // fields keep their own names (tracing-journald prefixes them with `F_` unless told
    // otherwise), so `journalctl MESSAGE_ID=…` and `BUNDLE=…` of docs/journal.md match.
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer.with_field_prefix(None);
            tracing_subscriber::registry()
                .with(filter)
                .with(layer)
                .init();
            return;
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(|| crate::progress::LogWriter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time();
    tracing_subscriber::registry().with(filter).with(fmt).init();
}
