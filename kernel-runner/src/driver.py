# bai-krunner's Python query-mode driver: runs snippets in one globals dict and completes
# names in it, reports on fd 4.
import ast, builtins, json, os, sys, traceback


def _main():
    sentinel = os.environ.pop("BAI_KRUNNER_SENTINEL", "")
    ctl = os.fdopen(3, "r", encoding="utf-8", errors="replace")
    status = os.fdopen(4, "w", encoding="utf-8")

    def report(*words):
        status.write(" ".join([sentinel] + [str(w) for w in words]) + "\n")
        status.flush()

    def ask(prompt="", password=False):
        if prompt:
            sys.stdout.write(str(prompt))
        sys.stdout.flush()
        sys.stderr.flush()
        report("input", 1 if password else 0)
        line = ctl.readline()
        kind, _, data = line.rstrip("\n").partition(" ")
        if kind != "input":
            raise EOFError("no input")
        return json.loads(data)

    builtins.input = lambda prompt="": ask(prompt)
    try:
        import getpass

        getpass.getpass = lambda prompt="Password: ", stream=None: ask(prompt, True)
    except Exception:
        pass
    sys.stdin = open(os.devnull)
    g = {"__name__": "__main__", "__builtins__": builtins}

    def run(path):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                tree = ast.parse(f.read(), "<input>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, "<input>", "exec"), g)
            if last is not None:
                value = eval(compile(last, "<input>", "eval"), g)
                if value is not None:
                    print(repr(value))
            return 0
        except SystemExit as e:
            if e.code is None:
                return 0
            if isinstance(e.code, int):
                return e.code
            print(e.code, file=sys.stderr)
            return 1
        except KeyboardInterrupt as e:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
            return 130
        except BaseException as e:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
            return 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except Exception:
                pass

    def complete(text):
        import rlcompleter

        completer = rlcompleter.Completer(g)
        found = []
        try:
            while len(found) < 200:
                match = completer.complete(text, len(found))
                if match is None:
                    break
                found.append(match)
        except Exception:
            pass
        return found

    report("ready")
    while True:
        rc = None
        try:
            line = ctl.readline()
            if not line:
                break
            kind, _, arg = line.rstrip("\n").partition(" ")
            if kind == "complete":
                report("completions", json.dumps(complete(json.loads(arg))))
                continue
            if kind != "code":
                continue
            rc = 1
            rc = run(json.loads(arg))
        except KeyboardInterrupt:
            if rc is None:
                continue
            rc = 130
        report("done", rc)


_main()
