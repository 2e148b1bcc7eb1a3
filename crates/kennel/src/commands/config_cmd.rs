//! `kennel config show`: the effective configuration after file, environment and flags.

use std::process::ExitCode;

use clap::Subcommand;

use crate::config;
use crate::Global;

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration as TOML (secrets redacted).
    Show,
}

pub fn run(g: &Global, cmd: ConfigCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCmd::Show => {
            let (mut cfg, file) = config::load(g.config.as_deref(), &[])?;
            let redact = |o: &mut Option<String>| {
                if o.is_some() {
                    *o = Some("<redacted>".into());
                }
            };
            redact(&mut cfg.server.auth.admin_key);
            redact(&mut cfg.server.auth.hash_key);
            redact(&mut cfg.client.api_key);
            redact(&mut cfg.daemon.api_key);
            redact(&mut cfg.relay.api_key);
            for k in cfg
                .relay
                .daemon_keys
                .iter_mut()
                .chain(cfg.relay.admin_keys.iter_mut())
            {
                *k = "<redacted>".into();
            }
            if g.json {
                crate::commands::print_json(&cfg)?;
            } else {
                match &file {
                    Some(f) => println!("# loaded from {}", f.display()),
                    None => {
                        println!("# no config file found; defaults, KENNEL_* environment and flags")
                    }
                }
                print!("{}", toml::to_string_pretty(&cfg)?);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
