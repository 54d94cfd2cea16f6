//! Where `observer run`'s options come from: one definition, the clap arguments of
//! [`super::run::RunArgs`], serves the flags, the environment variables (clap's `env`,
//! `OBSERVER_*`) and the TOML file `--config` names, whose keys are the arguments' ids
//! (`max_peers` for `--max-peers`). Every value, wherever it comes from, goes through that
//! argument's own value parser, so a bad one is refused with the same reason; file values become
//! the arguments' defaults, so clap's own precedence does the rest: flag > env > file > default.

use std::{
    collections::BTreeMap,
    ffi::{OsStr, OsString},
    path::Path,
};

use clap::{
    Arg, ArgAction, ArgMatches, Command, CommandFactory as _, FromArgMatches as _,
    error::{ContextKind, ContextValue},
    parser::ValueSource,
};
use observer::api::ConfigSetting;

use super::Cli;

/// The subcommand whose options the file and the environment set.
const RUN: &str = "run";
/// The `run` option that names the file (not a key of it).
const CONFIG: &str = "config";

/// Why the command line could not be taken.
#[derive(Debug)]
pub enum Error {
    /// A bad flag, `--help` or `--version`: clap's own message and exit code.
    Usage(clap::Error),
    /// A bad environment variable or configuration file: one line naming the field, the value
    /// and what is allowed.
    Config(String),
}

impl From<clap::Error> for Error {
    fn from(e: clap::Error) -> Self {
        Self::Usage(e)
    }
}

/// The parsed command line, and for `observer run` the effective configuration: every option by
/// its file key, with its value and where it came from.
pub struct Parsed {
    pub cli: Cli,
    pub config: BTreeMap<String, ConfigSetting>,
}

/// Parses `args` (with the program name first) and, for `observer run`, the environment and the
/// `--config` file.
pub fn parse(args: &[OsString]) -> Result<Parsed, Error> {
    let command = Cli::command();
    // The command line alone first: a bad flag is clap's error, naming the flag; and what the
    // command line sets is known before the environment is read.
    let on_cli = match command.clone().mut_subcommand(RUN, without_env).try_get_matches_from(args) {
        Ok(matches) => matches,
        // --help and --version from the whole definition, environment variables included.
        Err(e) if !e.use_stderr() => return Err(command.try_get_matches_from(args).err().unwrap_or(e).into()),
        Err(e) => return Err(e.into()),
    };
    let Some((RUN, given)) = on_cli.subcommand() else {
        return Ok(Parsed { cli: Cli::from_arg_matches(&on_cli)?, config: BTreeMap::new() });
    };
    let Some(run) = command.find_subcommand(RUN).cloned() else {
        return Ok(Parsed { cli: Cli::from_arg_matches(&on_cli)?, config: BTreeMap::new() });
    };
    let options: Vec<&Arg> = settings(&run).collect();

    // The environment, for what the command line does not set (clap reads it only then).
    let from_cli = |id: &str| given.value_source(id) == Some(ValueSource::CommandLine);
    for arg in &options {
        let Some(name) = arg.get_env() else { continue };
        let Some(value) = std::env::var_os(name) else { continue };
        if !from_cli(arg.get_id().as_str()) {
            check(arg, &value).map_err(|why| {
                Error::Config(format!("{}={}: {why}", name.to_string_lossy(), value.to_string_lossy()))
            })?;
        }
    }

    // The file: from --config, else from its environment variable.
    let file = match given.get_one::<std::path::PathBuf>(CONFIG) {
        Some(path) => Some((format!("--{CONFIG} {}", path.display()), path.clone())),
        None => options.iter().find(|a| a.get_id() == CONFIG).and_then(|a| a.get_env()).and_then(|name| {
            std::env::var_os(name)
                .map(|p| (format!("{}={}", name.to_string_lossy(), Path::new(&p).display()), p.into()))
        }),
    };
    let from_file = match &file {
        Some((label, path)) => read_file(path, label, &options)?,
        None => BTreeMap::new(),
    };

    // File values as the options' defaults: clap then prefers the flag, then the environment.
    let command = command.mut_subcommand(RUN, |mut run| {
        for (key, value) in &from_file {
            run = run.mut_arg(key, |a| a.default_value(value.clone()));
        }
        run
    });
    let matches = command.try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let config = match matches.subcommand() {
        Some((RUN, run)) => effective(&options, run, &from_file),
        _ => BTreeMap::new(),
    };
    Ok(Parsed { cli, config })
}

/// `run`'s options, `--help` aside.
fn settings(run: &Command) -> impl Iterator<Item = &Arg> {
    run.get_arguments().filter(|a| !matches!(a.get_action(), ArgAction::Help | ArgAction::Version))
}

fn without_env(mut run: Command) -> Command {
    let ids: Vec<_> = run.get_arguments().map(|a| a.get_id().clone()).collect();
    for id in ids {
        run = run.mut_arg(id, |a| a.env(None::<&str>));
    }
    run
}

/// Every option with its value and where it came from.
fn effective(
    options: &[&Arg],
    run: &ArgMatches,
    from_file: &BTreeMap<String, String>,
) -> BTreeMap<String, ConfigSetting> {
    options
        .iter()
        .map(|arg| {
            let id = arg.get_id().as_str();
            let source = match run.value_source(id) {
                Some(ValueSource::CommandLine) => "flag",
                Some(ValueSource::EnvVariable) => "env",
                Some(ValueSource::DefaultValue) if from_file.contains_key(id) => "file",
                _ => "default",
            };
            let value = run
                .get_raw(id)
                .map(|values| values.map(|v| v.to_string_lossy().into_owned()).collect::<Vec<_>>().join(","));
            (id.to_string(), ConfigSetting { value, source: source.into() })
        })
        .collect()
}

/// Reads the TOML file at `path` (`label`: how the user named it) into option id → value text,
/// each value checked by its option's parser.
fn read_file(path: &Path, label: &str, options: &[&Arg]) -> Result<BTreeMap<String, String>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{label}: cannot read it: {e}")))?;
    parse_file(&text, label, options).map_err(Error::Config)
}

fn parse_file(text: &str, label: &str, options: &[&Arg]) -> Result<BTreeMap<String, String>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        let message = e.message().trim().replace('\n', "; ");
        match line {
            Some(line) => format!("{label}: line {line}: {message}"),
            None => format!("{label}: {message}"),
        }
    })?;
    let keys: Vec<&Arg> = options.iter().copied().filter(|a| a.get_id() != CONFIG).collect();
    let mut values = BTreeMap::new();
    for (key, value) in &table {
        let Some(arg) = keys.iter().find(|a| a.get_id() == key.as_str()) else {
            let valid: Vec<&str> = keys.iter().map(|a| a.get_id().as_str()).collect();
            return Err(format!("{label}: unknown key `{key}`; valid keys: {}", valid.join(", ")));
        };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Datetime(d) => d.to_string(),
            toml::Value::Array(_) | toml::Value::Table(_) => {
                return Err(format!("{label}: {key} = {value}: must be {}", one_value(arg)));
            }
        };
        check(arg, OsStr::new(&text)).map_err(|why| format!("{label}: {key} = {value}: {why}"))?;
        values.insert(key.clone(), text);
    }
    Ok(values)
}

/// What one value of `arg` is, for a file that gives it a list or a table.
fn one_value(arg: &Arg) -> String {
    match arg.get_value_names().and_then(|n| n.first()) {
        Some(name) => format!("one value ({name}), not a list or table"),
        None => "true or false".into(),
    }
}

/// Runs `value` through `arg`'s own value parser, as if given as `--LONG=VALUE`: the reason it
/// is refused, in the parser's words.
fn check(arg: &Arg, value: &OsStr) -> Result<(), String> {
    let probe = arg.clone().env(None::<&str>).default_value(None::<&str>).action(ArgAction::Set).num_args(1);
    let mut flag = OsString::from(format!("--{}=", arg.get_long().unwrap_or(arg.get_id().as_str())));
    flag.push(value);
    Command::new("observer")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(probe)
        .try_get_matches_from([flag])
        .map(drop)
        .map_err(|e| reason(&e))
}

/// A value parser's refusal, without clap's framing.
fn reason(e: &clap::Error) -> String {
    if let Some(source) = std::error::Error::source(e) {
        return source.to_string();
    }
    if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
        return format!("must be one of {}", valid.join(", "));
    }
    let rendered = e.render().to_string();
    rendered.lines().next().unwrap_or_default().trim_start_matches("error: ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_command() -> Command {
        Cli::command().find_subcommand(RUN).cloned().expect("observer run exists")
    }

    fn file(text: &str) -> Result<BTreeMap<String, String>, String> {
        let run = run_command();
        let options: Vec<&Arg> = settings(&run).collect();
        parse_file(text, "--config observer.toml", &options)
    }

    #[test]
    fn every_run_option_has_its_observer_env_variable() {
        let run = run_command();
        for arg in settings(&run) {
            let want = format!("OBSERVER_{}", arg.get_id().as_str().to_uppercase());
            assert_eq!(arg.get_env().and_then(OsStr::to_str), Some(want.as_str()), "{}", arg.get_id());
        }
    }

    #[test]
    fn a_file_sets_options_by_their_ids() {
        let values = file("max_peers = 7\ncri_timeout = \"3s\"\nprobe_stats = true\nprobes = \"tracepoint\"\n")
            .expect("a valid file");
        assert_eq!(values["max_peers"], "7");
        assert_eq!(values["cri_timeout"], "3s");
        assert_eq!(values["probe_stats"], "true");
        assert_eq!(values["probes"], "tracepoint");
    }

    #[test]
    fn bad_files_name_the_field_the_value_and_what_is_allowed() {
        let cases = [
            ("max_peers = 0", "--config observer.toml: max_peers = 0: must be at least 1"),
            ("max_peers = \"many\"", "--config observer.toml: max_peers = \"many\": must be a whole number at least 1"),
            ("max_sockets = 10", "--config observer.toml: max_sockets = 10: must be from 1024 to 16777216"),
            (
                "probes = \"ebpf\"",
                "--config observer.toml: probes = \"ebpf\": must be one of auto, btf, tracepoint, kprobe",
            ),
            ("ring_buffer_size = 5000", "--config observer.toml: ring_buffer_size = 5000: must be a power of two"),
            ("cri_timeout = 3", "--config observer.toml: cri_timeout = 3: must be a duration such as 500ms"),
            ("listen = [1, 2]", "--config observer.toml: listen = [1, 2]: must be one value (ADDR)"),
            ("max_peer = 5", "--config observer.toml: unknown key `max_peer`; valid keys: listen, ring_buffer_size"),
            ("config = \"x\"", "unknown key `config`"),
            ("max_peers = ", "--config observer.toml: line 1: "),
        ];
        for (text, want) in cases {
            let err = file(text).expect_err(text);
            assert!(err.contains(want), "{text}: {err}");
            assert!(!err.contains('\n'), "{text}: not one line: {err}");
        }
    }

    #[test]
    fn flags_are_refused_in_the_same_words() {
        let args: Vec<OsString> = ["observer", "run", "--max-peers", "0"].iter().map(OsString::from).collect();
        match parse(&args) {
            Err(Error::Usage(e)) => {
                let text = e.render().to_string();
                assert!(
                    text.contains("'0'") && text.contains("--max-peers") && text.contains("must be at least 1"),
                    "{text}"
                );
            }
            Err(Error::Config(e)) => panic!("a flag error reported as a config error: {e}"),
            Ok(_) => panic!("--max-peers 0 accepted"),
        }
    }

    #[test]
    fn without_a_file_everything_is_default_or_flag() {
        let args: Vec<OsString> =
            ["observer", "run", "--max-peers", "9", "--probe-stats"].iter().map(OsString::from).collect();
        let Ok(parsed) = parse(&args) else { panic!("valid flags refused") };
        let config = parsed.config;
        assert_eq!(config["max_peers"], ConfigSetting { value: Some("9".into()), source: "flag".into() });
        assert_eq!(config["probe_stats"], ConfigSetting { value: Some("true".into()), source: "flag".into() });
        assert_eq!(config["netns"].value, None);
        // The test runner's environment may set OBSERVER_PROBES (the kprobe matrix).
        assert!(["default", "env"].contains(&config["probes"].source.as_str()));
        assert!(config.contains_key("config") && config.contains_key("log_format"));
    }
}
