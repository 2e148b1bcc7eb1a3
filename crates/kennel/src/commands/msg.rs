//! `kennel msg`: send messages to agents, read an inbox (and follow it), claim a message.

use std::process::ExitCode;

use anyhow::bail;
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use kennel_proto::agents::{ClaimMessage, InboxPage, Message, SendMessage};

use crate::client::Client;
use crate::commands::print_json;
use crate::Global;

#[derive(Debug, Args)]
pub struct MsgArgs {
    #[command(flatten)]
    pub target: crate::client::Target,
    #[command(subcommand)]
    pub cmd: MsgCmd,
}

#[derive(Debug, Subcommand)]
pub enum MsgCmd {
    /// Send a message. TO is an agent id, or policy:NAME, label:L, tag:T, cap:C, channel:C.
    Send {
        to: String,
        body: String,
        /// Send as this agent (default: `user`).
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        subject: Option<String>,
        /// One recipient takes it by claiming it.
        #[arg(long)]
        claimable: bool,
        /// Seconds until it expires unread.
        #[arg(long, value_name = "SECS")]
        ttl: Option<u64>,
        /// Sending again with the same key does not send twice.
        #[arg(long, value_name = "KEY")]
        idempotency_key: Option<String>,
        /// The message this one answers.
        #[arg(long, value_name = "ID")]
        reply_to: Option<String>,
    },
    /// Print an agent's inbox (messages to it and every address it answers to); with -f, keep
    /// printing new messages as they arrive.
    Inbox {
        agent: String,
        #[arg(short, long)]
        follow: bool,
        /// Only messages after this cursor (a message's seq).
        #[arg(long, default_value_t = 0)]
        after: i64,
    },
    /// Claim a claimable message for an agent: the first claim wins.
    Claim {
        id: String,
        /// The agent claiming it.
        #[arg(long = "as", value_name = "AGENT")]
        agent: String,
        /// Seconds the claim holds (default: the server's, 300).
        #[arg(long, value_name = "SECS")]
        ttl: Option<u64>,
    },
}

pub async fn run(c: &Client, g: &Global, cmd: MsgCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        MsgCmd::Send {
            to,
            body,
            from,
            subject,
            claimable,
            ttl,
            idempotency_key,
            reply_to,
        } => {
            let req = SendMessage {
                to,
                from,
                kind: None,
                subject,
                body,
                payload: None,
                idempotency_key,
                claimable,
                ttl_secs: ttl,
                reply_to,
            };
            let m: Message = c.post("/api/v1/messages", &req).await?;
            if g.json {
                print_json(&m)?;
            } else {
                println!("{} to {} ({})", m.id, m.to, m.state.as_str());
            }
        }
        MsgCmd::Inbox {
            agent,
            follow,
            after,
        } => {
            if !follow {
                print_page(c, g, &agent, after).await?;
                return Ok(ExitCode::SUCCESS);
            }
            // The inbox's own stream: what is there, then each new message as it comes.
            let path = format!("/api/v1/agents/{agent}/inbox/stream?after={after}");
            let mut events = c.sse(&path, None).await?;
            while let Some(ev) = events.next().await {
                let ev = match ev {
                    Ok(ev) => ev,
                    Err(e) => bail!("the inbox stream broke: {e}"),
                };
                match ev.event.as_str() {
                    "message" => {
                        let m: Message = serde_json::from_str(&ev.data)?;
                        print_message(g, &m)?;
                    }
                    "error" => bail!("the server ended the inbox stream: {}", ev.data),
                    _ => {}
                }
            }
            bail!("the server closed the inbox stream");
        }
        MsgCmd::Claim { id, agent, ttl } => {
            let req = ClaimMessage {
                agent_id: agent,
                instance_id: None,
                epoch: None,
                ttl_secs: ttl,
            };
            let m: Message = c
                .post(&format!("/api/v1/messages/{id}/claim"), &req)
                .await?;
            if g.json {
                print_json(&m)?;
            } else {
                println!(
                    "{} claimed by {} until {}",
                    m.id,
                    m.claimed_by.as_deref().unwrap_or("-"),
                    m.claim_expires_at.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the inbox after `cursor`, every page; returns the new cursor.
async fn print_page(c: &Client, g: &Global, agent: &str, mut cursor: i64) -> anyhow::Result<i64> {
    loop {
        let page: InboxPage = c
            .get(&format!("/api/v1/agents/{agent}/inbox?after={cursor}"))
            .await?;
        for m in &page.messages {
            print_message(g, m)?;
        }
        let done = page.messages.is_empty() || page.next_cursor == cursor;
        cursor = page.next_cursor;
        if done {
            return Ok(cursor);
        }
    }
}

fn print_message(g: &Global, m: &Message) -> anyhow::Result<()> {
    if g.json {
        return print_json(m);
    }
    let subject = m
        .subject
        .as_deref()
        .map(|s| format!(" [{s}]"))
        .unwrap_or_default();
    println!(
        "#{} {} from {} to {}{}: {}",
        m.seq, m.id, m.from, m.to, subject, m.body
    );
    Ok(())
}
