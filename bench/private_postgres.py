"""A private PostgreSQL for a benchmark, as the tests start one (tests/common/postgres.rs):
`initdb` into a temp dir, `postgres` on a free port of 127.0.0.1, trust authentication,
run as the `postgres` system user when this process is root. Unlike the tests' server it
keeps `fsync` on (the default: what a deployment runs) and loads pg_stat_statements, so
that a benchmark can count the statements a workload sent. Removed on close."""
import glob, os, pwd, shutil, subprocess, tempfile, time

from peers import free_port


def bin_dir():
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(d.split("/")[-2].split(".")[0]), reverse=True)
    dirs += ["/usr/local/bin"] + os.environ.get("PATH", "").split(":")
    for d in dirs:
        if os.path.isfile(os.path.join(d, "initdb")) and os.path.isfile(os.path.join(d, "postgres")):
            return d
    raise SystemExit("PostgreSQL is not installed (apt-get install -y postgresql)")


class Postgres:
    def __init__(self, prefix="taskd-bench-pg-"):
        self.bin = bin_dir()
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.user = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            self.user = (pw.pw_uid, pw.pw_gid)
            os.chown(self.dir, *self.user)
        os.chmod(self.dir, 0o700)
        self.data = os.path.join(self.dir, "data")
        self.run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                 "--locale=C", "--no-sync")
        self.port = free_port()
        self.log = open(os.path.join(self.dir, "postgres.log"), "w")
        if self.user:
            os.chown(self.log.name, *self.user)
        self.proc = subprocess.Popen(
            [os.path.join(self.bin, "postgres"), "-D", self.data, "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
             "-c", "max_connections=200", "-c", "shared_preload_libraries=pg_stat_statements",
             "-c", "pg_stat_statements.track=top"],
            stdout=self.log, stderr=self.log, preexec_fn=self._drop, cwd=self.dir)
        for _ in range(400):
            if subprocess.run(self.psql_argv("postgres", "SELECT 1"), capture_output=True).returncode == 0:
                return
            time.sleep(0.05)
        raise SystemExit("postgres did not start: " + open(self.log.name).read())

    def _drop(self):
        if self.user:
            os.setgid(self.user[1])
            os.setuid(self.user[0])

    def run(self, name, *args):
        subprocess.run([os.path.join(self.bin, name), *args], check=True, preexec_fn=self._drop,
                       cwd=self.dir, stdout=subprocess.DEVNULL)

    def psql_argv(self, db, sql, user="postgres"):
        return [os.path.join(self.bin, "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", db, "-c", sql]

    def psql(self, db, sql, user="postgres"):
        return subprocess.run(self.psql_argv(db, sql, user), check=True, capture_output=True,
                              text=True).stdout

    def url(self, db):
        return f"postgres://postgres@127.0.0.1:{self.port}/{db}?sslmode=disable"

    def new_db(self, name):
        self.psql("postgres", f"DROP DATABASE IF EXISTS {name}")
        self.psql("postgres", f"CREATE DATABASE {name}")
        return name

    def version(self):
        return self.psql("postgres", "SHOW server_version").strip()

    def close(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
