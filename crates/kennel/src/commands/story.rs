//! `kennel story`: the build agents' stories (the coordinator's copy of the pipeline): add,
//! list, show, move, block, delete.

use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};
use kennel_proto::api::{BlockStory, CreateStory, MoveStory, StoryStage, StoryView};
use kennel_proto::link::RepoSpec;

use crate::client::Client;
use crate::commands::print_json;
use crate::table;
use crate::Global;

#[derive(Debug, Args)]
pub struct StoryArgs {
    #[command(flatten)]
    pub target: crate::client::Target,
    #[command(subcommand)]
    pub cmd: StoryCmd,
}

/// A stage, as written on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StageArg {
    #[value(name = "1_backlog", alias = "backlog")]
    Backlog,
    #[value(name = "2_current", alias = "current")]
    Current,
    #[value(name = "3_qa", alias = "qa")]
    Qa,
    #[value(name = "4_merge", alias = "merge")]
    Merge,
    #[value(name = "5_done", alias = "done")]
    Done,
    #[value(name = "6_archived", alias = "archived")]
    Archived,
}

impl From<StageArg> for StoryStage {
    fn from(s: StageArg) -> StoryStage {
        match s {
            StageArg::Backlog => StoryStage::Backlog,
            StageArg::Current => StoryStage::Current,
            StageArg::Qa => StoryStage::Qa,
            StageArg::Merge => StoryStage::Merge,
            StageArg::Done => StoryStage::Done,
            StageArg::Archived => StoryStage::Archived,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum StoryCmd {
    /// Add a story to the backlog.
    Add {
        title: String,
        /// What to build (the agent's prompt).
        #[arg(long)]
        body: Option<String>,
        /// Agent profile that builds it (default: claude).
        #[arg(long)]
        profile: Option<String>,
        /// Repository URL or local path.
        #[arg(long)]
        repo: Option<String>,
        /// Branch to start from.
        #[arg(long, requires = "repo")]
        base: Option<String>,
        /// A story that must be done first (repeatable).
        #[arg(long = "depends-on")]
        depends_on: Vec<String>,
        /// Its id (default: one is made).
        #[arg(long)]
        id: Option<String>,
    },
    /// List stories.
    List,
    /// Show one story.
    Show { id: String },
    /// Move a story to a stage (2_current hands it to the agents).
    Move { id: String, stage: StageArg },
    /// Block a story with a reason; without one, unblock it.
    Block { id: String, reason: Option<String> },
    /// Delete a story.
    Delete { id: String },
}

pub async fn run(c: &Client, g: &Global, cmd: StoryCmd) -> anyhow::Result<ExitCode> {
    let show = |s: StoryView| -> anyhow::Result<()> {
        if g.json {
            print_json(&s)
        } else {
            print!("{}", render(std::slice::from_ref(&s)));
            if let Some(b) = &s.blocked {
                println!("blocked: {b}");
            }
            Ok(())
        }
    };
    match cmd {
        StoryCmd::Add {
            title,
            body,
            profile,
            repo,
            base,
            depends_on,
            id,
        } => {
            let req = CreateStory {
                id,
                title,
                body,
                profile,
                repo: repo.map(|url| RepoSpec {
                    url,
                    base_branch: base.unwrap_or_default(),
                }),
                depends_on,
                max_retries: None,
            };
            show(c.post("/api/v1/stories", &req).await?)?;
        }
        StoryCmd::List => {
            let all: Vec<StoryView> = c.get("/api/v1/stories").await?;
            if g.json {
                print_json(&all)?;
            } else if all.is_empty() {
                println!("no stories yet; add one with `kennel story add TITLE`");
            } else {
                print!("{}", render(&all));
            }
        }
        StoryCmd::Show { id } => show(c.get(&format!("/api/v1/stories/{id}")).await?)?,
        StoryCmd::Move { id, stage } => {
            let req = MoveStory {
                stage: stage.into(),
            };
            show(c.post(&format!("/api/v1/stories/{id}/move"), &req).await?)?
        }
        StoryCmd::Block { id, reason } => {
            let req = BlockStory { reason };
            show(c.post(&format!("/api/v1/stories/{id}/block"), &req).await?)?
        }
        StoryCmd::Delete { id } => {
            c.delete_no_content(&format!("/api/v1/stories/{id}"))
                .await?;
            if !g.json {
                println!("story `{id}` deleted");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn render(all: &[StoryView]) -> String {
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|s| {
            let stage = serde_json::to_value(s.stage)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            vec![
                s.id.clone(),
                stage,
                s.owner.clone().unwrap_or_else(|| "-".into()),
                s.branch.clone().unwrap_or_else(|| "-".into()),
                s.title.clone(),
            ]
        })
        .collect();
    table::render(&["ID", "STAGE", "OWNER", "BRANCH", "TITLE"], &rows)
}
