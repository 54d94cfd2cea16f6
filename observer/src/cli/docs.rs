//! `observer completions SHELL` and `observer man`: generated from the clap definitions, so they
//! list exactly the subcommands and flags the binary takes.

use std::io::Write as _;

use anyhow::Context as _;
use clap::{Args, CommandFactory as _};
use clap_complete::Shell;

use super::Cli;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for; write the script where it loads completions, e.g.
    /// `observer completions bash > /etc/bash_completion.d/observer`.
    #[arg(value_name = "SHELL", value_enum)]
    pub shell: Shell,
}

pub fn completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "observer", &mut out);
    std::io::stdout().write_all(&out).context("writing the completion script to stdout")
}

pub fn man() -> anyhow::Result<()> {
    std::io::stdout().write_all(&man_page()?).context("writing the man page to stdout")
}

/// observer(1): the top-level page, then one section per subcommand with its options (each
/// with its environment variable), then how the configuration is resolved and the log.
pub fn man_page() -> anyhow::Result<Vec<u8>> {
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let man = clap_mangen::Man::new(command.clone());
    let mut page = Roff::default();
    page.add(|w| man.render_title(w))?;
    page.add(|w| man.render_name_section(w))?;
    page.add(|w| man.render_synopsis_section(w))?;
    page.add(|w| man.render_description_section(w))?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name();
        let about = sub.get_long_about().or(sub.get_about()).map(|a| a.to_string()).unwrap_or_default();
        page.text(&format!(".SH \"OBSERVER {}\"\n.B observer {name}\n[\\fIOPTIONS\\fR]\n.PP\n", name.to_uppercase()));
        page.text(&escape(&about));
        page.text("\n");
        let sub = clap_mangen::Man::new(sub.clone());
        page.add(|w| {
            let mut options = Vec::new();
            sub.render_options_section(&mut options)?;
            let options = String::from_utf8_lossy(&options).replacen(".SH OPTIONS", ".SS Options", 1);
            w.extend_from_slice(options.as_bytes());
            Ok(())
        })?;
    }
    page.text(CONFIGURATION);
    Ok(page.0.into_bytes())
}

/// A man page put together from clap_mangen's sections, each of which starts with the same
/// preamble: kept once.
#[derive(Default)]
struct Roff(String);

impl Roff {
    const PREAMBLE: [&str; 2] = [".ie \\n(.g .ds Aq \\(aq", ".el .ds Aq '"];

    fn add(&mut self, render: impl FnOnce(&mut Vec<u8>) -> std::io::Result<()>) -> anyhow::Result<()> {
        let mut out = Vec::new();
        render(&mut out).context("rendering the man page")?;
        let text = String::from_utf8_lossy(&out);
        let first = self.0.is_empty();
        for line in text.lines() {
            if first || !Self::PREAMBLE.contains(&line) {
                self.0.push_str(line);
                self.0.push('\n');
            }
        }
        Ok(())
    }

    fn text(&mut self, text: &str) {
        self.0.push_str(text);
    }
}

/// Text for roff: no line may start with a control character.
fn escape(text: &str) -> String {
    text.lines()
        .map(|l| l.replace('\\', "\\e"))
        .map(|l| if l.starts_with(['.', '\'']) { format!("\\&{l}") } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}

const CONFIGURATION: &str = r#".SH CONFIGURATION
Every \fBobserver run\fR option can be given as a flag, as an environment variable
(\fBOBSERVER_\fR and the option's name in capitals with \fB_\fR for \fB-\fR, e.g.
\fBOBSERVER_MAX_PEERS\fR), or as a key of the TOML file named by \fB--config\fR (or
\fBOBSERVER_CONFIG\fR), the option's name with \fB_\fR for \fB-\fR:
.PP
.nf
.RS
listen = "0.0.0.0:9645"
max_peers = 100
cri_timeout = "3s"
probe_stats = true
.RE
.fi
.PP
A flag wins over the environment, the environment over the file, the file over the default.
An unknown key or a value the option does not take is an error naming it. The effective
configuration, each value with its source (\fBdefault\fR, \fBfile\fR, \fBenv\fR, \fBflag\fR), is
in \fB/api/v1/status\fR under \fBconfig\fR and in \fBobserver status\fR.
.SH LOGGING
The daemon logs on standard error, as text or, with \fB--log-format json\fR, one JSON object per
line. \fBRUST_LOG\fR sets the level (default \fBinfo\fR; e.g. \fBdebug\fR,
\fBwarn,observer=debug\fR). Standard output carries only the \fB--log-events\fR records.
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn script(shell: Shell) -> String {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "observer", &mut out);
        String::from_utf8(out).expect("UTF-8")
    }

    #[test]
    fn completions_name_every_subcommand_and_bash_accepts_the_script() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = script(shell);
            for sub in Cli::command().get_subcommands() {
                assert!(text.contains(sub.get_name()), "{shell}: {} missing", sub.get_name());
            }
        }
        let path = std::env::temp_dir().join(format!("observer-completion-{}.bash", std::process::id()));
        std::fs::write(&path, script(Shell::Bash)).expect("writing the script");
        let checked = std::process::Command::new("bash").arg("-n").arg(&path).output().expect("running bash -n");
        let _ = std::fs::remove_file(&path);
        assert!(checked.status.success(), "bash -n: {}", String::from_utf8_lossy(&checked.stderr));
    }

    #[test]
    fn the_man_page_names_every_run_flag_and_its_environment_variable() {
        let page = String::from_utf8(man_page().expect("man page")).expect("UTF-8");
        assert!(page.contains("\n.TH observer 1 "), "{page}");
        let command = Cli::command();
        let run = command.find_subcommand("run").expect("run");
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            // roff escapes the dashes of flags.
            assert!(page.contains(&format!("\\-\\-{}", long.replace('-', "\\-"))), "--{long} missing");
            if let Some(env) = arg.get_env() {
                assert!(page.contains(env.to_str().expect("ASCII")), "{env:?} missing");
            }
        }
        for sub in command.get_subcommands() {
            assert!(
                page.contains(&format!("OBSERVER {}", sub.get_name().to_uppercase())),
                "{} missing",
                sub.get_name()
            );
        }
    }
}
