package main

import (
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The unit in postfix-snippets passes systemd-analyze verify, with
// ExecStart pointing at a binary built from the tree.
func TestSystemdUnitVerifies(t *testing.T) {
	analyze := requireTool(t, "systemd-analyze", "systemd")
	unit, err := os.ReadFile("postfix-snippets/stsmap.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=notify", "StateDirectory=stsmap", "DynamicUser=yes", "ProtectSystem=strict", "NoNewPrivileges=yes"} {
		if !strings.Contains(string(unit), "\n"+want+"\n") {
			t.Errorf("stsmap.service lacks %s", want)
		}
	}
	bin := buildBinary(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "stsmap.service")
	body := strings.Replace(string(unit), "ExecStart=/usr/local/bin/stsmap", "ExecStart="+bin, 1)
	if err := os.WriteFile(path, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil || strings.Contains(string(out), "stsmap.service") {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// Type=notify: stsmap tells systemd when its listeners are up, and when it
// stops; its unix socket gets the configured group (SPEC 1.5).
func TestServeNotifiesAndOwnsSocket(t *testing.T) {
	dir := t.TempDir()
	notifyPath := filepath.Join(dir, "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", notifyPath)
	me, _ := user.Current()
	group, _ := user.LookupGroupId(me.Gid)

	w := newTestWorld(t)
	sock := filepath.Join(dir, "stsmap.sock")
	cfg := testConfig(w, "unix:"+sock)
	cfg.Socketmap.UnixSocketMode = 0o660
	cfg.Socketmap.UnixSocketGroup = group.Name
	startServe(t, cfg, testEnv(w))

	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 64)
	n, err := conn.Read(buf)
	if err != nil || string(buf[:n]) != "READY=1" {
		t.Errorf("notification: got %q, %v; want READY=1", buf[:n], err)
	}
	st, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if gid := st.Sys().(*syscall.Stat_t).Gid; strconv.Itoa(int(gid)) != me.Gid || st.Mode().Perm() != 0o660 {
		t.Errorf("socket: gid %d mode %v, want gid %s mode 0660", gid, st.Mode().Perm(), me.Gid)
	}
}
