
use builtin;
use str;

set edit:completion:arg-completer[fcdev] = {|@words|
    fn spaces {|n|
        builtin:repeat $n ' ' | str:join ''
    }
    fn cand {|text desc|
        edit:complex-candidate $text &display=$text' '(spaces (- 14 (wcswidth $text)))$desc
    }
    var command = 'fcdev'
    for word $words[1..-1] {
        if (str:has-prefix $word '-') {
            break
        }
        set command = $command';'$word
    }
    var completions = [
        &'fcdev'= {
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand -V 'Print version'
            cand --version 'Print version'
            cand login 'Log in to an fcdev server with a token (kept 0600 in the config dir)'
            cand up 'Create your cluster (or resume/repair it) and wait until every VM is ready'
            cand status 'Show your namespace, clusters, VMs and tunnel peers'
            cand images 'List the prepared images of the server'
            cand tunnel 'Join your namespace''s network from this machine (userspace WireGuard)'
            cand reset 'Put a cluster back to its onboarding snapshot'
            cand exec 'Run a command in a VM (no tunnel needed): `fcdev exec n1 -- uptime`; exits with its exit code'
            cand down 'Delete a cluster: VMs, disks, its snapshots and this machine''s tunnel peer'
            cand stop 'Save the cluster to disk and end its VMs (memory, processes and disks kept; the host''s RAM freed)'
            cand start 'Resume a stopped cluster where it was (also what `fcdev up` does to a stopped cluster)'
            cand snapshot 'Named snapshots of a cluster: save, restore, list, rm'
            cand hosts 'Print /etc/hosts lines for your VMs'
            cand ssh 'Open an ssh session to a VM (no tunnel needed: it uses the running one or starts one in the background)'
            cand ssh-config 'Write ssh config entries for your VMs (`ssh n1.<namespace>.fcdev`, scp, rsync, VS Code Remote-SSH)'
            cand logs 'Show a VM''s console log (-f follows it)'
            cand doctor 'Check this machine''s setup: server, token, versions, key files, the hub (a real handshake), TUN, ssh'
            cand image 'Build or snapshot prepared images (host side)'
            cand server 'Run the fcdev server: control API, VM orchestration and the WireGuard hub (host side)'
            cand completions 'Print a shell completion script'
            cand known-hosts 'Internal: ssh''s KnownHostsCommand (a VM''s host key as the server knows it)'
            cand __socks-connect 'Internal: ssh''s ProxyCommand through the rootless tunnel''s SOCKS5 proxy'
            cand __test-vm 'Internal: the process behind one VM of the test backend'
            cand guest-agent 'Internal: the guest agent of Debian images (runs inside a VM, on its second serial port)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;login'= {
            cand --server 'The fcdev server''s API URL, e.g. http://host:7070'
            cand --profile 'The profile (server + token) to use'
            cand --token-stdin 'Read the token from standard input instead of a hidden prompt'
            cand --json 'Print the result as JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;up'= {
            cand --image 'The image to build the cluster from (default: the profile''s image, `tiny`)'
            cand --name 'The cluster''s name (default: the profile''s cluster, `dev`)'
            cand --local-port 'With --local: the port of the local server''s API'
            cand --profile 'The profile (server + token) to use'
            cand --local 'Run everything on this machine: start (or reuse) a local `fcdev server --dev`, log in, build the default image if missing, then bring the cluster up'
            cand --no-wait 'Return once the server accepted the request, without waiting for the VMs'
            cand --json 'Print the cluster as JSON (no progress bars)'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;status'= {
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;images'= {
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;tunnel'= {
            cand --mode 'tun (a TUN device; needs root or CAP_NET_ADMIN), proxy (rootless: SOCKS5 + forwards) or auto'
            cand --socks 'Where the SOCKS5 proxy listens (proxy mode). It resolves `<vm>.<namespace>.fcdev` itself'
            cand --http 'Also run an HTTP proxy here (proxy mode; implies it under `--mode auto`): CONNECT and plain http:// requests, names resolved like the SOCKS5 proxy''s, e.g. `HTTPS_PROXY=http://127.0.0.1:8888`'
            cand -L 'Forward a local port to a VM (proxy mode): LOCALPORT:VM:PORT, e.g. -L 8080:n1:80. Repeatable'
            cand --forward 'Forward a local port to a VM (proxy mode): LOCALPORT:VM:PORT, e.g. -L 8080:n1:80. Repeatable'
            cand --tun-name 'The TUN device''s name (TUN mode)'
            cand --name 'This machine''s peer name (default: the host name)'
            cand --wg-config 'Write a wg-quick configuration for stock WireGuard clients to FILE (0600; stdout without FILE) instead of running the tunnel. It holds this machine''s private key (never sent to the server) and the same address as `fcdev tunnel`: use one or the other at a time. Calling it again gives the same key and address'
            cand --idle-exit 'Internal: end once no local connection has been open for SECS (proxy mode)'
            cand --profile 'The profile (server + token) to use'
            cand --json 'Status as JSON lines on stdout instead of a status line'
            cand --stop 'Stop the background tunnel `fcdev ssh` started for this profile (it also ends by itself when idle)'
            cand --background 'Internal: this is the shared background tunnel of `fcdev ssh --stdio`'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;reset'= {
            cand --name 'The cluster (default: the profile''s cluster)'
            cand --profile 'The profile (server + token) to use'
            cand -y 'Do not ask for confirmation'
            cand --yes 'Do not ask for confirmation'
            cand --json 'Print the cluster as JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;exec'= {
            cand --name 'The cluster (default: the profile''s cluster)'
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;down'= {
            cand --name 'The cluster (default: the profile''s cluster)'
            cand --profile 'The profile (server + token) to use'
            cand --keep-peer 'Keep this machine''s tunnel peer registered'
            cand -y 'Do not ask for confirmation'
            cand --yes 'Do not ask for confirmation'
            cand --json 'Print the result as JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;stop'= {
            cand --name 'The cluster (default: the profile''s cluster)'
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print the cluster as JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;start'= {
            cand --name 'The cluster (default: the profile''s cluster)'
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print the cluster as JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;snapshot'= {
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand save 'Save the whole cluster as it is now: every VM''s memory, processes and disk (taken together)'
            cand restore 'Bring the whole cluster back to a snapshot (what happened since is lost)'
            cand list 'List the cluster''s snapshots: name, when, size on disk, image'
            cand rm 'Remove a snapshot'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;snapshot;save'= {
            cand --name 'The cluster (default: the profile''s cluster)'
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print the result as JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;snapshot;restore'= {
            cand --name 'The cluster (default: the profile''s cluster)'
            cand --profile 'The profile (server + token) to use'
            cand -y 'Do not ask for confirmation'
            cand --yes 'Do not ask for confirmation'
            cand --json 'Print the cluster as JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;snapshot;list'= {
            cand --name 'The cluster (default: the profile''s cluster)'
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;snapshot;rm'= {
            cand --name 'The cluster (default: the profile''s cluster)'
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print the result as JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;snapshot;help'= {
            cand save 'Save the whole cluster as it is now: every VM''s memory, processes and disk (taken together)'
            cand restore 'Bring the whole cluster back to a snapshot (what happened since is lost)'
            cand list 'List the cluster''s snapshots: name, when, size on disk, image'
            cand rm 'Remove a snapshot'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;snapshot;help;save'= {
        }
        &'fcdev;snapshot;help;restore'= {
        }
        &'fcdev;snapshot;help;list'= {
        }
        &'fcdev;snapshot;help;rm'= {
        }
        &'fcdev;snapshot;help;help'= {
        }
        &'fcdev;hosts'= {
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;ssh'= {
            cand --name 'The cluster (default: the profile''s cluster, or the one the host name names)'
            cand -u 'The user in the VM'
            cand --user 'The user in the VM'
            cand --port 'The VM''s port (with --stdio)'
            cand --profile 'The profile (server + token) to use'
            cand --stdio 'Relay one connection to the VM''s ssh port on stdin/stdout (ssh''s ProxyCommand; what `fcdev ssh-config` writes). Uses the running tunnel, or starts a shared background one that ends when idle'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;ssh-config'= {
            cand --file 'The ssh config file (default: ~/.ssh/config)'
            cand --profile 'The profile (server + token) to use'
            cand --remove 'Remove the block instead'
            cand --dry-run 'Print the block instead of writing it'
            cand --json 'Print the result as JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;logs'= {
            cand -n 'How many of the last lines to print first (at most 10000)'
            cand --lines 'How many of the last lines to print first (at most 10000)'
            cand --name 'The cluster (default: the profile''s cluster, `dev`)'
            cand --profile 'The profile (server + token) to use'
            cand -f 'Keep printing what the console prints next (Ctrl-C to stop)'
            cand --follow 'Keep printing what the console prints next (Ctrl-C to stop)'
            cand --json 'One JSON object per line (`{"vm":"n1","line":"…"}`), as lines come'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;doctor'= {
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print the checks as JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;image'= {
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand build 'Build an image from Debian packages (recipes: tiny, press). press is skipped when already built from the same recipe (use --force)'
            cand snapshot 'Boot the image''s VMs on an isolated NIC and save the onboarding snapshot restored by `fcdev up`'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;image;build'= {
            cand --out 'Output folder (default: <data dir>/images/NAME)'
            cand --kernel-version 'Guest kernel version under /boot (default: the newest *-cloud-amd64)'
            cand --hook 'press: a shell script run in the guest''s root filesystem after the recipe (operator''s extra steps)'
            cand --profile 'The profile (server + token) to use'
            cand --no-ssh 'Leave dropbear (ssh) out'
            cand --force 'Build even when the output holds an image of the same recipe'
            cand --json 'Print the result as JSON (progress stays on stderr)'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;image;snapshot'= {
            cand --out 'Image folder (default: <data dir>/images/NAME)'
            cand --accel 'Accelerator: auto (KVM only where the CPU shows vmx/svm), kvm or tcg'
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print the result as JSON (progress stays on stderr)'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;image;help'= {
            cand build 'Build an image from Debian packages (recipes: tiny, press). press is skipped when already built from the same recipe (use --force)'
            cand snapshot 'Boot the image''s VMs on an isolated NIC and save the onboarding snapshot restored by `fcdev up`'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;image;help;build'= {
        }
        &'fcdev;image;help;snapshot'= {
        }
        &'fcdev;image;help;help'= {
        }
        &'fcdev;server'= {
            cand --listen 'Where the API listens'
            cand --hub-listen 'Where the WireGuard hub listens (UDP). Port 0 picks a free one'
            cand --hub-endpoint 'The endpoint peers are told to send to (default: the hub''s listen address)'
            cand --hub-tun 'The hub''s TUN device towards the VM bridges, or `none` to run the hub without one'
            cand --data-dir 'State, images and VM folders (default: the user data dir, or FCDEV_DATA_DIR)'
            cand --database 'Keep the state in this PostgreSQL database (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`, or a unix socket: `postgres:///DB?host=/run/postgresql`) instead of the SQLite file DATA_DIR/state.db. The admin commands (`fcdev server user …`) take the same flag'
            cand --images 'The image catalog (default: DATA_DIR/images)'
            cand --backend 'How VMs run: `qemu` (real VMs), or `process` (a test backend of local processes, for tests only)'
            cand --accel 'QEMU accelerator: auto (KVM only where the CPU shows vmx/svm), kvm or tcg'
            cand --max-starts 'How many VMs may be starting at once (restoring until configured, booting until ready); the others wait in a queue and `fcdev up` shows "queued (n ahead)". 0: four per core, at least 8'
            cand --snapshot-quota 'Disk that one engineer''s named snapshots may take (`fcdev snapshot save`), e.g. `20G`, `512M`; `0`: no limit. A save that would go over is refused with the snapshots to remove'
            cand --idle-stop 'Stop (`fcdev stop`) a ready cluster left alone this long: no state change and no tunnel handshake of its engineer, e.g. `8h`, `30m`; `0`: never (the default). `fcdev start` or `up` resumes it'
            cand --netns 'Run VMs, bridges and the hub''s TUN inside this network namespace (created if missing); the API and hub sockets stay in the namespace the server was started in. `none` keeps everything where it is. Default: `fcdev-dev` with --dev, else none'
            cand --user 'With --dev: the first engineer''s name (default: your login name)'
            cand --role 'What this process does: `all` (API, VMs and hub in one process: the default), `control` (API, auth, allocation and the hosts'' leases; no VMs, no hub; use --database postgres://…), or `agent` (one per host: registers with --control and heartbeats; the token comes from FCDEV_HOST_TOKEN or --host-token-file)'
            cand --control 'With --role agent: the control plane''s URL (`http://control:7070`)'
            cand --host-name 'With --role agent: this host''s name, as added with `fcdev server host add NAME`'
            cand --host-token-file 'With --role agent: a file holding the host token (instead of FCDEV_HOST_TOKEN)'
            cand --host-lease 'Seconds a host''s lease lasts: a host whose agent sent no heartbeat for that long is `lost` (agents send one every third of it)'
            cand --profile 'The profile (server + token) to use'
            cand --dev 'The embedded default for one machine: API and hub on loopback, VMs in their own network namespace (`fcdev-dev`), and a fresh login token printed for the first engineer'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help (see more with ''--help'')'
            cand --help 'Print help (see more with ''--help'')'
            cand user 'Manage engineers and their tokens'
            cand host 'Manage the hosts whose agents (`fcdev server --role agent`) may join this control plane'
            cand stop 'Stop the server running on this machine''s data dir (the one `fcdev up --local` started). Its VMs keep running and are re-adopted at the next start'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;server;user'= {
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand add 'Add an engineer and print their token (shown once; the server keeps only its hash)'
            cand token 'Print a fresh extra token for an engineer'
            cand revoke 'Revoke every token of an engineer and drop their WireGuard peers (a running server''s hub drops them within a second)'
            cand remove 'Remove an engineer: their clusters (the running server stops the VMs), peers, namespace and tokens'
            cand list 'List engineers'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;server;user;add'= {
            cand --data-dir 'data-dir'
            cand --database 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)'
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;server;user;token'= {
            cand --data-dir 'data-dir'
            cand --database 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)'
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;server;user;revoke'= {
            cand --data-dir 'data-dir'
            cand --database 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)'
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;server;user;remove'= {
            cand --data-dir 'data-dir'
            cand --database 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)'
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;server;user;list'= {
            cand --data-dir 'data-dir'
            cand --database 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)'
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print JSON: `[{"name": …}]`'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;server;user;help'= {
            cand add 'Add an engineer and print their token (shown once; the server keeps only its hash)'
            cand token 'Print a fresh extra token for an engineer'
            cand revoke 'Revoke every token of an engineer and drop their WireGuard peers (a running server''s hub drops them within a second)'
            cand remove 'Remove an engineer: their clusters (the running server stops the VMs), peers, namespace and tokens'
            cand list 'List engineers'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;server;user;help;add'= {
        }
        &'fcdev;server;user;help;token'= {
        }
        &'fcdev;server;user;help;revoke'= {
        }
        &'fcdev;server;user;help;remove'= {
        }
        &'fcdev;server;user;help;list'= {
        }
        &'fcdev;server;user;help;help'= {
        }
        &'fcdev;server;host'= {
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
            cand add 'Add a host and print its token (shown once; the store keeps only its hash). Its agent reads it from FCDEV_HOST_TOKEN or --host-token-file'
            cand list 'List the hosts: state (new, live, lost), last heartbeat, hub, capacity'
            cand revoke 'Revoke a host''s token: its agent is refused (401) from its next heartbeat'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;server;host;add'= {
            cand --data-dir 'data-dir'
            cand --database 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)'
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print JSON: `{"name": …, "token": …}`'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;server;host;list'= {
            cand --data-dir 'data-dir'
            cand --database 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)'
            cand --profile 'The profile (server + token) to use'
            cand --json 'Print JSON'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;server;host;revoke'= {
            cand --data-dir 'data-dir'
            cand --database 'The server''s PostgreSQL database, when it runs with `--database` (default: DATA_DIR/state.db)'
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;server;host;help'= {
            cand add 'Add a host and print its token (shown once; the store keeps only its hash). Its agent reads it from FCDEV_HOST_TOKEN or --host-token-file'
            cand list 'List the hosts: state (new, live, lost), last heartbeat, hub, capacity'
            cand revoke 'Revoke a host''s token: its agent is refused (401) from its next heartbeat'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;server;host;help;add'= {
        }
        &'fcdev;server;host;help;list'= {
        }
        &'fcdev;server;host;help;revoke'= {
        }
        &'fcdev;server;host;help;help'= {
        }
        &'fcdev;server;stop'= {
            cand --data-dir 'data-dir'
            cand --profile 'The profile (server + token) to use'
            cand --local 'The server of this machine (the only kind `stop` knows)'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;server;help'= {
            cand user 'Manage engineers and their tokens'
            cand host 'Manage the hosts whose agents (`fcdev server --role agent`) may join this control plane'
            cand stop 'Stop the server running on this machine''s data dir (the one `fcdev up --local` started). Its VMs keep running and are re-adopted at the next start'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;server;help;user'= {
            cand add 'Add an engineer and print their token (shown once; the server keeps only its hash)'
            cand token 'Print a fresh extra token for an engineer'
            cand revoke 'Revoke every token of an engineer and drop their WireGuard peers (a running server''s hub drops them within a second)'
            cand remove 'Remove an engineer: their clusters (the running server stops the VMs), peers, namespace and tokens'
            cand list 'List engineers'
        }
        &'fcdev;server;help;user;add'= {
        }
        &'fcdev;server;help;user;token'= {
        }
        &'fcdev;server;help;user;revoke'= {
        }
        &'fcdev;server;help;user;remove'= {
        }
        &'fcdev;server;help;user;list'= {
        }
        &'fcdev;server;help;host'= {
            cand add 'Add a host and print its token (shown once; the store keeps only its hash). Its agent reads it from FCDEV_HOST_TOKEN or --host-token-file'
            cand list 'List the hosts: state (new, live, lost), last heartbeat, hub, capacity'
            cand revoke 'Revoke a host''s token: its agent is refused (401) from its next heartbeat'
        }
        &'fcdev;server;help;host;add'= {
        }
        &'fcdev;server;help;host;list'= {
        }
        &'fcdev;server;help;host;revoke'= {
        }
        &'fcdev;server;help;stop'= {
        }
        &'fcdev;server;help;help'= {
        }
        &'fcdev;completions'= {
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;known-hosts'= {
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;__socks-connect'= {
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;__test-vm'= {
            cand --name 'name'
            cand --run-dir 'run-dir'
            cand --cmdline 'cmdline'
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;guest-agent'= {
            cand --profile 'The profile (server + token) to use'
            cand -v 'More log output (repeat for more)'
            cand --verbose 'More log output (repeat for more)'
            cand -h 'Print help'
            cand --help 'Print help'
        }
        &'fcdev;help'= {
            cand login 'Log in to an fcdev server with a token (kept 0600 in the config dir)'
            cand up 'Create your cluster (or resume/repair it) and wait until every VM is ready'
            cand status 'Show your namespace, clusters, VMs and tunnel peers'
            cand images 'List the prepared images of the server'
            cand tunnel 'Join your namespace''s network from this machine (userspace WireGuard)'
            cand reset 'Put a cluster back to its onboarding snapshot'
            cand exec 'Run a command in a VM (no tunnel needed): `fcdev exec n1 -- uptime`; exits with its exit code'
            cand down 'Delete a cluster: VMs, disks, its snapshots and this machine''s tunnel peer'
            cand stop 'Save the cluster to disk and end its VMs (memory, processes and disks kept; the host''s RAM freed)'
            cand start 'Resume a stopped cluster where it was (also what `fcdev up` does to a stopped cluster)'
            cand snapshot 'Named snapshots of a cluster: save, restore, list, rm'
            cand hosts 'Print /etc/hosts lines for your VMs'
            cand ssh 'Open an ssh session to a VM (no tunnel needed: it uses the running one or starts one in the background)'
            cand ssh-config 'Write ssh config entries for your VMs (`ssh n1.<namespace>.fcdev`, scp, rsync, VS Code Remote-SSH)'
            cand logs 'Show a VM''s console log (-f follows it)'
            cand doctor 'Check this machine''s setup: server, token, versions, key files, the hub (a real handshake), TUN, ssh'
            cand image 'Build or snapshot prepared images (host side)'
            cand server 'Run the fcdev server: control API, VM orchestration and the WireGuard hub (host side)'
            cand completions 'Print a shell completion script'
            cand known-hosts 'Internal: ssh''s KnownHostsCommand (a VM''s host key as the server knows it)'
            cand __socks-connect 'Internal: ssh''s ProxyCommand through the rootless tunnel''s SOCKS5 proxy'
            cand __test-vm 'Internal: the process behind one VM of the test backend'
            cand guest-agent 'Internal: the guest agent of Debian images (runs inside a VM, on its second serial port)'
            cand help 'Print this message or the help of the given subcommand(s)'
        }
        &'fcdev;help;login'= {
        }
        &'fcdev;help;up'= {
        }
        &'fcdev;help;status'= {
        }
        &'fcdev;help;images'= {
        }
        &'fcdev;help;tunnel'= {
        }
        &'fcdev;help;reset'= {
        }
        &'fcdev;help;exec'= {
        }
        &'fcdev;help;down'= {
        }
        &'fcdev;help;stop'= {
        }
        &'fcdev;help;start'= {
        }
        &'fcdev;help;snapshot'= {
            cand save 'Save the whole cluster as it is now: every VM''s memory, processes and disk (taken together)'
            cand restore 'Bring the whole cluster back to a snapshot (what happened since is lost)'
            cand list 'List the cluster''s snapshots: name, when, size on disk, image'
            cand rm 'Remove a snapshot'
        }
        &'fcdev;help;snapshot;save'= {
        }
        &'fcdev;help;snapshot;restore'= {
        }
        &'fcdev;help;snapshot;list'= {
        }
        &'fcdev;help;snapshot;rm'= {
        }
        &'fcdev;help;hosts'= {
        }
        &'fcdev;help;ssh'= {
        }
        &'fcdev;help;ssh-config'= {
        }
        &'fcdev;help;logs'= {
        }
        &'fcdev;help;doctor'= {
        }
        &'fcdev;help;image'= {
            cand build 'Build an image from Debian packages (recipes: tiny, press). press is skipped when already built from the same recipe (use --force)'
            cand snapshot 'Boot the image''s VMs on an isolated NIC and save the onboarding snapshot restored by `fcdev up`'
        }
        &'fcdev;help;image;build'= {
        }
        &'fcdev;help;image;snapshot'= {
        }
        &'fcdev;help;server'= {
            cand user 'Manage engineers and their tokens'
            cand host 'Manage the hosts whose agents (`fcdev server --role agent`) may join this control plane'
            cand stop 'Stop the server running on this machine''s data dir (the one `fcdev up --local` started). Its VMs keep running and are re-adopted at the next start'
        }
        &'fcdev;help;server;user'= {
            cand add 'Add an engineer and print their token (shown once; the server keeps only its hash)'
            cand token 'Print a fresh extra token for an engineer'
            cand revoke 'Revoke every token of an engineer and drop their WireGuard peers (a running server''s hub drops them within a second)'
            cand remove 'Remove an engineer: their clusters (the running server stops the VMs), peers, namespace and tokens'
            cand list 'List engineers'
        }
        &'fcdev;help;server;user;add'= {
        }
        &'fcdev;help;server;user;token'= {
        }
        &'fcdev;help;server;user;revoke'= {
        }
        &'fcdev;help;server;user;remove'= {
        }
        &'fcdev;help;server;user;list'= {
        }
        &'fcdev;help;server;host'= {
            cand add 'Add a host and print its token (shown once; the store keeps only its hash). Its agent reads it from FCDEV_HOST_TOKEN or --host-token-file'
            cand list 'List the hosts: state (new, live, lost), last heartbeat, hub, capacity'
            cand revoke 'Revoke a host''s token: its agent is refused (401) from its next heartbeat'
        }
        &'fcdev;help;server;host;add'= {
        }
        &'fcdev;help;server;host;list'= {
        }
        &'fcdev;help;server;host;revoke'= {
        }
        &'fcdev;help;server;stop'= {
        }
        &'fcdev;help;completions'= {
        }
        &'fcdev;help;known-hosts'= {
        }
        &'fcdev;help;__socks-connect'= {
        }
        &'fcdev;help;__test-vm'= {
        }
        &'fcdev;help;guest-agent'= {
        }
        &'fcdev;help;help'= {
        }
    ]
    $completions[$command]
}
