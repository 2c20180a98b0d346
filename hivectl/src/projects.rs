//! `project add|rm|show|deploy-key|https-token|status` and `projects`.

use std::collections::HashMap;

use hive_proto::v1::{
    CloneAccessReply, CloneAccessRequest, CreateProjectRequest, DeleteProjectRequest,
    GetProjectRequest, ListProjectsRequest,
};

use crate::cli::ProjectAdd;
use crate::ctl::{CliError, Ctl};
use crate::render;
use hive_proto::v1 as pb;

/// `project add`.
pub(crate) async fn add(ctl: &mut Ctl, a: ProjectAdd) -> Result<(), CliError> {
    let secret = match &a.secret_file {
        Some(path) => read_secret_file(path)?,
        None => a.secret.unwrap_or_default(),
    };
    let req = CreateProjectRequest {
        name: a.name.clone(),
        repo_url: a.repo,
        secret,
        branch: a.branch.unwrap_or_default(),
        tags: a.tags.unwrap_or_default(),
        size_class: a.size.unwrap_or_default(),
        private_network: a.private_network.unwrap_or_default(),
        steps: a.steps,
        timeout_secs: a.timeout.unwrap_or(0),
        env: a.env.into_iter().collect::<HashMap<_, _>>(),
        hive: a.hive.unwrap_or_default(),
    };
    let p = ctl
        .client
        .create_project(req)
        .await
        .map_err(|s| ctl.status(format!("add project {:?}", a.name), s))?
        .into_inner();
    if ctl.json {
        ctl.out_json(&render::project_json(&p))
    } else {
        ctl.out(&format!("project {} added (id {})\n", p.name, p.id))
    }
}

/// `project rm`.
pub(crate) async fn remove(ctl: &mut Ctl, name: String) -> Result<(), CliError> {
    ctl.client
        .delete_project(DeleteProjectRequest {
            project: name.clone(),
        })
        .await
        .map_err(|s| ctl.status(format!("delete project {name:?}"), s))?;
    if ctl.json {
        ctl.out_json(&serde_json::json!({ "deleted": name }))
    } else {
        ctl.out(&format!("project {name} deleted\n"))
    }
}

/// `project show`.
pub(crate) async fn show(ctl: &mut Ctl, name: String, now: i64) -> Result<(), CliError> {
    let p = ctl
        .client
        .get_project(GetProjectRequest {
            project: name.clone(),
        })
        .await
        .map_err(|s| ctl.status(format!("project {name:?}"), s))?
        .into_inner();
    if ctl.json {
        ctl.out_json(&render::project_json(&p))
    } else {
        ctl.out(&render::project_text(&p, now))
    }
}

/// `projects`.
pub(crate) async fn list(ctl: &mut Ctl, now: i64) -> Result<(), CliError> {
    let ps = ctl
        .client
        .list_projects(ListProjectsRequest {})
        .await
        .map_err(|s| ctl.status("list projects", s))?
        .into_inner()
        .projects;
    if ctl.json {
        ctl.out_json(&serde_json::Value::Array(
            ps.iter().map(render::project_json).collect(),
        ))
    } else {
        ctl.out(&render::projects_table(&ps, now))
    }
}

/// The webhook secret from a file (`-`: stdin), one trailing newline dropped; empty refused.
fn read_secret_file(path: &std::path::Path) -> Result<String, CliError> {
    use std::io::Read;
    let refused = |message: String| CliError::Refused {
        what: format!("--secret-file {}", path.display()),
        message,
    };
    let mut text = String::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| refused(e.to_string()))?;
    } else {
        text = std::fs::read_to_string(path).map_err(|e| refused(e.to_string()))?;
    }
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    crate::cli::parse_secret(&text).map_err(refused)
}

/// `project deploy-key`.
pub(crate) async fn deploy_key(
    ctl: &mut Ctl,
    project: String,
    rotate: bool,
    known_hosts: Option<std::path::PathBuf>,
    forge_host_keys: bool,
) -> Result<(), CliError> {
    let known_hosts_text = match &known_hosts {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| CliError::Refused {
                what: format!("--known-hosts {}", path.display()),
                message: e.to_string(),
            })?;
            if text.trim().is_empty() {
                return Err(CliError::Refused {
                    what: format!("--known-hosts {}", path.display()),
                    message: "the file is empty: give the server's host keys (e.g. from \
                              `ssh-keyscan HOST`), or --forge-host-keys for the built-in ones"
                        .into(),
                });
            }
            text
        }
        None => String::new(),
    };
    let r = ctl
        .client
        .clone_access(CloneAccessRequest {
            project: project.clone(),
            deploy_key: true,
            rotate_deploy_key: rotate,
            set_known_hosts: known_hosts.is_some() || forge_host_keys,
            known_hosts: known_hosts_text,
            ..Default::default()
        })
        .await
        .map_err(|s| ctl.status(format!("deploy key of project {project}"), s))?
        .into_inner();
    if ctl.json {
        return ctl.out_json(&clone_access_json(&r));
    }
    let mut out = String::new();
    out.push_str(&r.deploy_public_key);
    out.push('\n');
    let made = if r.deploy_key_created {
        "made just now"
    } else {
        "kept (--rotate makes a new one)"
    };
    out.push_str(&format!(
        "# deploy key of project {} ({}, {made}): add the line above to the repository's \
         deploy keys on the forge, read access only.\n",
        r.project, r.deploy_key_fingerprint
    ));
    out.push_str(&format!("# {}\n", known_hosts_text_of(&r)));
    // The key line alone on stdout's first line, so `| head -1` gives it to a script.
    ctl.out(&out)
}

/// `project https-token`.
pub(crate) async fn https_token(
    ctl: &mut Ctl,
    project: String,
    user: Option<String>,
    remove: bool,
) -> Result<(), CliError> {
    let mut token = String::new();
    if !remove {
        use std::io::{IsTerminal, Read};
        if std::io::stdin().is_terminal() {
            eprintln!("https token of {project} (end with Ctrl-D):");
        }
        std::io::stdin()
            .read_to_string(&mut token)
            .map_err(|e| CliError::Refused {
                what: "read the https token from stdin".into(),
                message: e.to_string(),
            })?;
        let t = token.trim();
        if t.is_empty() {
            return Err(CliError::Refused {
                what: "https token".into(),
                message: "stdin was empty: pipe the token in (`printf %s \"$TOKEN\" | \
                          hivectl project https-token PROJECT`), or --remove to drop it"
                    .into(),
            });
        }
        token = t.to_string();
    }
    let r = ctl
        .client
        .clone_access(CloneAccessRequest {
            project: project.clone(),
            set_https_token: true,
            https_token: token,
            https_user: user.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(|s| ctl.status(format!("https token of project {project}"), s))?
        .into_inner();
    if ctl.json {
        return ctl.out_json(&clone_access_json(&r));
    }
    ctl.out(&if r.https_token {
        format!(
            "https token of project {} set (user {}); https clones send it, the steps never \
             see it\n",
            r.project,
            if r.https_user.is_empty() {
                "x-access-token"
            } else {
                &r.https_user
            }
        )
    } else {
        format!("https token of project {} removed\n", r.project)
    })
}

fn known_hosts_text_of(r: &CloneAccessReply) -> String {
    if r.known_hosts_source == "project" {
        format!(
            "ssh host keys trusted: the project's own ({} lines)",
            r.known_hosts_lines
        )
    } else {
        format!(
            "ssh host keys trusted: github.com, gitlab.com, codeberg.org (built in, {} lines); \
             another server needs --known-hosts FILE",
            r.known_hosts_lines
        )
    }
}

fn clone_access_json(r: &CloneAccessReply) -> serde_json::Value {
    serde_json::json!({
        "project": r.project,
        "deploy_public_key": r.deploy_public_key,
        "deploy_key_fingerprint": r.deploy_key_fingerprint,
        "deploy_key_created": r.deploy_key_created,
        "known_hosts": r.known_hosts_source,
        "known_hosts_lines": r.known_hosts_lines,
        "https_token": r.https_token,
        "https_user": r.https_user,
    })
}

/// `project status`: set, turn off or show the project's commit statuses to its forge.
pub(crate) async fn forge_status(
    ctl: &mut Ctl,
    a: crate::cli::ProjectStatus,
) -> Result<(), CliError> {
    let read = |flag: &str, path: &std::path::Path| -> Result<String, CliError> {
        use std::io::Read;
        let refused = |message: String| CliError::Refused {
            what: format!("{flag} {}", path.display()),
            message,
        };
        let mut text = String::new();
        if path.as_os_str() == "-" {
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| refused(e.to_string()))?;
        } else {
            text = std::fs::read_to_string(path).map_err(|e| refused(e.to_string()))?;
        }
        if text.trim().is_empty() {
            return Err(refused("it is empty".into()));
        }
        Ok(text)
    };
    let token = match &a.forge_token_file {
        Some(p) => read("--forge-token-file", p)?.trim().to_string(),
        None => String::new(),
    };
    let app_key_pem = match &a.app_key_file {
        Some(p) => read("--app-key-file", p)?,
        None => String::new(),
    };
    let r = ctl
        .client
        .forge_status(pb::ForgeStatusRequest {
            project: a.project.clone(),
            forge: a.forge.clone().unwrap_or_default(),
            api_url: a.api.clone().unwrap_or_default(),
            token,
            app_id: a.app_id.unwrap_or(0),
            app_key_pem,
            off: a.off,
        })
        .await
        .map_err(|s| ctl.status(format!("forge statuses of project {}", a.project), s))?
        .into_inner();
    if ctl.json {
        return ctl.out_json(&serde_json::json!({
            "project": r.project,
            "forge": r.forge,
            "api_url": r.api_url,
            "repository": r.repository,
            "auth": r.auth,
            "app_id": r.app_id,
            "updated_at": crate::render::time_json(r.updated_at_ms),
            "pending": r.pending,
            "last_error": r.last_error,
        }));
    }
    let mut out = String::new();
    if r.forge.is_empty() {
        out.push_str(&format!(
            "project {}: no commit statuses (set them with --forge and a token or App)\n",
            r.project
        ));
    } else {
        let auth = if r.auth == "github-app" {
            format!("GitHub App {}", r.app_id)
        } else {
            "token".to_string()
        };
        out.push_str(&format!(
            "project {}: commit statuses to {} {} ({}), repository {}, context hive/{}\n",
            r.project, r.forge, r.api_url, auth, r.repository, r.project
        ));
    }
    if r.pending > 0 || !r.last_error.is_empty() {
        out.push_str(&format!("waiting to be sent: {}\n", r.pending));
    }
    if !r.last_error.is_empty() {
        out.push_str(&format!("last error: {}\n", r.last_error));
    }
    ctl.out(&out)
}
